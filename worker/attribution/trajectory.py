"""A training trajectory (checkpoints with their step, learning rate, momentum and stage) and its segments.

Ordering and steps: checkpoints are ordered by (stage, step). Steps may be counted over the whole run or
restart in each stage: when a stage's first step is not after the previous stage's last step, the stage's
steps are taken as counted from the end of the previous stage. ``run_step`` is the step in the whole run.

Segments (docs/methods.md, source): ``segments`` an int k = k equal parts of the run by step (a checkpoint on a
boundary belongs to the earlier part; parts are also cut where the stage changes, so a segment never mixes
two stages' data; if an equal part would hold no checkpoint the checkpoints are split into k runs of
near-equal count instead); ``"stages"`` = one segment per stage; None = one per stage if there are several
stages, else 3 (capped at the number of checkpoints). T_s counts the steps from the previous segment's last
checkpoint (or step 0) to segment s's last checkpoint; eta_s is the mean effective learning rate
eta / (1 - momentum) of its checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from worker.attribution.types import AttributionError

SegmentSpec = int | Literal["stages"] | None
DEFAULT_SEGMENTS = 3


@dataclass(frozen=True)
class TrajectoryCheckpoint:
    """The parameters at one step of training. ``optimizer`` "sgd" (with momentum) is supported."""

    model: nn.Module
    step: int
    learning_rate: float
    momentum: float = 0.0
    stage: int = 0
    optimizer: str = "sgd"
    name: str = ""

    @property
    def effective_learning_rate(self) -> float:
        """eta / (1 - beta): the stationary step size of heavy-ball momentum."""
        return self.learning_rate / (1.0 - self.momentum)


@dataclass(frozen=True)
class Segment:
    """Consecutive checkpoints of one stage, treated as stationary."""

    index: int
    stage: int
    checkpoints: tuple[TrajectoryCheckpoint, ...]
    start_step: int  # run step where the segment starts (previous segment's last checkpoint, or 0)
    end_step: int  # run step of its last checkpoint

    @property
    def steps(self) -> int:
        """T_s."""
        return self.end_step - self.start_step

    @property
    def mean_learning_rate(self) -> float:
        """eta_s: mean effective learning rate of its checkpoints."""
        return sum(c.effective_learning_rate for c in self.checkpoints) / len(self.checkpoints)

    @property
    def horizon(self) -> float:
        """eta_s * T_s."""
        return self.mean_learning_rate * self.steps

    def describe(self, num_examples: int | None = None) -> dict[str, Any]:
        return {
            "index": self.index,
            "stage": self.stage,
            "start_step": self.start_step,
            "end_step": self.end_step,
            "steps": self.steps,
            "mean_learning_rate": self.mean_learning_rate,
            "num_examples": num_examples,
            "checkpoints": [{"step": c.step, "name": c.name} for c in self.checkpoints],
        }


def check_checkpoints(checkpoints: Sequence[TrajectoryCheckpoint]) -> None:
    if not checkpoints:
        raise AttributionError("the trajectory has no checkpoint")
    for c in checkpoints:
        if not (c.learning_rate > 0 and math.isfinite(c.learning_rate)):
            raise AttributionError(f"checkpoint at step {c.step} (stage {c.stage}) has no positive learning rate")
        if not 0 <= c.momentum < 1:
            raise AttributionError(f"checkpoint at step {c.step} (stage {c.stage}): momentum must lie in [0, 1)")
        if c.step < 0:
            raise AttributionError(f"checkpoint step must be >= 0, got {c.step}")
        if c.optimizer != "sgd":
            raise AttributionError(
                f"checkpoint at step {c.step} (stage {c.stage}) was trained with {c.optimizer!r}: only SGD "
                "(with momentum) trajectories are supported; the diagonal approximation for Adam-type optimizers "
                "(appendix C of the SOURCE paper) is not implemented yet"
            )
    keys = [(c.stage, c.step) for c in checkpoints]
    if len(set(keys)) != len(keys):
        raise AttributionError("two checkpoints share a (stage, step)")


def ordered(checkpoints: Sequence[TrajectoryCheckpoint]) -> list[TrajectoryCheckpoint]:
    return sorted(checkpoints, key=lambda c: (c.stage, c.step))


def run_steps(checkpoints: Sequence[TrajectoryCheckpoint]) -> list[int]:
    """The step of each (ordered) checkpoint in the whole run (see the module docstring)."""
    result: list[int] = []
    offset = 0
    for i, c in enumerate(checkpoints):
        previous = checkpoints[i - 1] if i > 0 else None
        if previous is not None and c.stage != previous.stage and c.step <= previous.step:
            offset = result[-1]  # this stage counts its steps from its own start
        result.append(offset + c.step)
    return result


def build_segments(checkpoints: Sequence[TrajectoryCheckpoint], spec: SegmentSpec) -> list[Segment]:
    """Segments of the trajectory in training order (see the module docstring)."""
    check_checkpoints(checkpoints)
    chain = ordered(checkpoints)
    steps = run_steps(chain)
    stages = sorted({c.stage for c in chain})
    if spec == "stages" or (spec is None and len(stages) > 1):
        groups = [[i for i, c in enumerate(chain) if c.stage == stage] for stage in stages]
    else:
        count = DEFAULT_SEGMENTS if spec is None else int(spec)
        if count < 1:
            raise AttributionError(f"segments must be >= 1, got {count}")
        if spec is not None and count > len(chain):
            raise AttributionError(
                f"segments={count} but the trajectory has {len(chain)} checkpoints: a segment would have none"
            )
        groups = _equal_parts(steps, min(count, len(chain)))
        groups = [part for group in groups for part in _split_by_stage(group, chain)]
    return _make_segments(chain, steps, groups)


def _equal_parts(steps: list[int], count: int) -> list[list[int]]:
    """Indices grouped into ``count`` equal parts of [0, last step]; by count when a part would be empty."""
    total = steps[-1]
    groups: list[list[int]] = [[] for _ in range(count)]
    if total > 0:
        for i, step in enumerate(steps):
            part = max(0, min(count - 1, math.ceil(step * count / total) - 1))
            groups[part].append(i)
    if any(not g for g in groups):
        bounds = [round(j * len(steps) / count) for j in range(count + 1)]
        groups = [list(range(bounds[j], bounds[j + 1])) for j in range(count)]
    return groups


def _split_by_stage(group: list[int], chain: list[TrajectoryCheckpoint]) -> list[list[int]]:
    parts: list[list[int]] = []
    for i in group:
        if parts and chain[parts[-1][-1]].stage == chain[i].stage:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def _make_segments(chain: list[TrajectoryCheckpoint], steps: list[int], groups: list[list[int]]) -> list[Segment]:
    segments: list[Segment] = []
    start = 0
    for index, group in enumerate(groups):
        end = steps[group[-1]]
        segments.append(Segment(index, chain[group[0]].stage, tuple(chain[i] for i in group), start, end))
        start = end
    return segments
