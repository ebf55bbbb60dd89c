"""Option shapes shared by several methods and by `POST /v1/fits`.

Each method's own options model lives in its method module (`worker/methods/<name>.py`); this module holds the
pieces they share, so that every rule about options is written once.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictInt, StrictStr, field_validator

from service.schemas.common import BatchSize, ModuleNames, Seed, StrictModel

# The engine's lists (defined once, there), re-exported for the request schemas.
from worker.attribution.options import FisherKind as FisherKind
from worker.attribution.options import FitStrategy as FitStrategy

# The options that decide what a curvature fit contains: an attribution that reuses a fit (fit_id) may not give
# other values for them.
FIT_LEVEL_FIELDS: tuple[str, ...] = ("strategy", "fisher", "fisher_samples", "seed", "layers")
# What is stored with a fit (`fits.options`): the fit-level options and the batch size it was made with (the
# batch size changes how fast a fit is made, not what it contains, so a later attribution may use another).
FIT_STORED_FIELDS: tuple[str, ...] = (*FIT_LEVEL_FIELDS, "batch_size")
DEFAULT_BATCH_SIZE = 256

Stages = Annotated[list[Annotated[StrictInt, Field(ge=0, le=10_000)]], Field(min_length=1, max_length=1000)]
StageDatasets = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]{1,5}$")], Annotated[StrictStr, Field(min_length=1, max_length=64)]],
    Field(min_length=1, max_length=1000),
]


def _normalise_fisher(value: object) -> object:
    # `fisher` is `true` (labels sampled from the model) or `empirical` (the given labels); JSON true means "true".
    return "true" if value is True else value


class FitLevelOptions(StrictModel):
    """Options that decide what a curvature fit contains."""

    fisher: FisherKind = Field(
        "true", description="`true`: labels sampled from the model; `empirical`: the given labels."
    )
    fisher_samples: StrictInt = Field(1, ge=1, le=64, description="Sampled labels per example (true Fisher).")
    seed: Seed = Field(0, description="Seed of the label sampling.")
    layers: ModuleNames | None = Field(None, description="Module names to track; default every Linear and Conv2d.")

    _fisher = field_validator("fisher", mode="before")(_normalise_fisher)


class FitSettings(FitLevelOptions):
    """What a stored fit was made with (`fits.options`, FIT_STORED_FIELDS): read back through this model."""

    strategy: FitStrategy = "ekfac"
    batch_size: BatchSize = DEFAULT_BATCH_SIZE


class TrajectoryOptions(StrictModel):
    """Options of the methods that read the training checkpoints (`tracin`, `source`): which stage trained on
    which dataset, and which stages are attributed (the rule is `worker.methods.stages.stage_plan`)."""

    stages: Stages | None = Field(
        None,
        description="Stages whose checkpoints (tracin) or segments (source) score the training examples; "
        "default: the stages trained on train_dataset_id.",
    )
    stage_datasets: StageDatasets | None = Field(
        None,
        description='Training dataset id of each stage (`{"0": id, "1": id}`); default: '
        "`train_dataset_id` for every stage.",
    )

    def dataset_of_stage(self, stages: list[int], train_dataset_id: str) -> dict[int, str]:
        given = self.stage_datasets or {}
        return {stage: given.get(str(stage), train_dataset_id) for stage in stages}
