"""A counter that reports (stage, completed, total) to a progress callback."""

from __future__ import annotations

from worker.attribution.types import Progress, no_progress


class StageCounter:
    """Counts work units of one stage; every ``advance`` reports to the callback (which may raise Cancelled)."""

    def __init__(self, progress: Progress | None, stage: str, total: int) -> None:
        self.progress = progress if progress is not None else no_progress
        self.stage = stage
        self.total = int(total)
        self.completed = 0

    def start(self) -> StageCounter:
        self.progress(self.stage, self.completed, self.total)
        return self

    def advance(self, amount: int) -> None:
        self.completed = min(self.total, self.completed + int(amount))
        self.progress(self.stage, self.completed, self.total)
