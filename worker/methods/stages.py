"""Which stage trained on which dataset, and which stages a trajectory method attributes: the rule, once.

The service applies it before queuing (a 422 naming the field) and the job applies it to the stored request.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.schemas.options import TrajectoryOptions
from worker.methods.base import MethodInputError


@dataclass(frozen=True)
class StagePlan:
    dataset_of: dict[int, str]
    attributed: list[int]


def stage_plan(options: TrajectoryOptions, stages: list[int], train_dataset_id: str) -> StagePlan:
    """``stages``: the stages that have checkpoints. The attributed stages (options.stages, default every stage
    trained on train_dataset_id) must train on train_dataset_id: their data are the ranked examples."""
    for stage in options.stages or []:
        if stage not in stages:
            raise MethodInputError(
                f"stage {stage} has no checkpoint (stages with checkpoints: {stages})", "body.options.stages"
            )
    given = options.stage_datasets or {}
    for key in given:
        if int(key) not in stages:
            raise MethodInputError(
                f"stage_datasets names stage {key!r}, which has no checkpoint (stages: {stages})",
                "body.options.stage_datasets",
            )
    if len(stages) > 1 and given:
        missing = [s for s in stages if str(s) not in given]
        if missing:
            raise MethodInputError(
                f"stage_datasets has no dataset for stage(s) {missing}", "body.options.stage_datasets"
            )
    dataset_of = options.dataset_of_stage(stages, train_dataset_id)
    attributed = (
        options.stages if options.stages is not None else [s for s in stages if dataset_of[s] == train_dataset_id]
    )
    if not attributed:
        raise MethodInputError(
            "no stage to attribute: no stage trains on train_dataset_id (see "
            "options.stage_datasets) and options.stages names none",
            "body.options.stages",
        )
    other = [s for s in attributed if dataset_of[s] != train_dataset_id]
    if other:
        raise MethodInputError(
            f"stage(s) {other} train on another dataset than train_dataset_id, so their data "
            "are not the attributed examples",
            "body.options.stages",
        )
    return StagePlan(dataset_of=dataset_of, attributed=sorted(attributed))
