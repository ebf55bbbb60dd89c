"""What a job's task is handed: where the database and blobs are, how to report progress, and how to finish.

Tasks (`worker/tasks/*`) import this module, never the runner; the runner imports the tasks through its table of
job kinds (`worker/tasks/__init__.py`), so the two never import each other in a cycle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from sqlalchemy.orm import Session

from service.db.session import session_scope
from service.db.tables import Job
from service.liveness import CancelRequested, LivenessPolicy, Superseded, finish, report_progress
from service.storage import BlobStore
from worker.attribution import Cancelled
from worker.devices import job_device
from worker.heartbeat import Heartbeat

PROGRESS_WRITE_SECONDS = 0.5

# send_shards(job_id, shard positions): one broker message per shard, each saying "this shard may need running"
ShardSender = Callable[[str, list[int]], None]
# send_merge(job_id, attempt): the merge of a sharded job's outputs, to a worker of the ``cpu`` queue
MergeSender = Callable[[str, int], None]


class JobFailed(Exception):
    """Ends the job ``failed`` with ``problem`` (an RFC 9457 problem found by the job's own work, e.g. by one of
    its shards)."""

    def __init__(self, problem: dict[str, Any]) -> None:
        super().__init__(str(problem.get("detail", "the job failed")))
        self.problem = problem


@dataclass
class JobContext:
    """What a task needs: where the database and blobs are, how to report progress, and how to finish."""

    job_id: str
    database_url: str
    store: BlobStore
    attempt: int = 1
    heartbeat: Heartbeat | None = None
    device_setting: str = "cpu"  # ATTRIB_DEVICE
    # sharded jobs (worker/tasks/sharded.py): the liveness policy, the shard size (0: never shard), the sender
    policy: LivenessPolicy | None = None
    shard_examples: int = 0
    send_shards: ShardSender | None = None
    # None: merge in this process (it consumes the cpu queue, or has no broker); else hand the merge over
    send_merge: MergeSender | None = None
    merge_handoff_seconds: float = 60.0
    _last_write: float = field(default=0.0)
    _last_stage: str = field(default="")

    @property
    def device(self) -> torch.device:
        """The device of this process's jobs (`worker.devices`); a job on a worker whose ``ATTRIB_DEVICE`` names a
        GPU it lacks fails with that reason."""
        return job_device(self.device_setting)

    def session(self) -> AbstractContextManager[Session]:
        return session_scope(self.database_url)

    def progress(self, stage: str, completed: int, total: int) -> None:
        """Write progress (throttled); stop the work with ``Cancelled`` if the job was cancelled, or with
        ``Superseded`` if this attempt no longer owns the job."""
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise Superseded(f"job {self.job_id} attempt {self.attempt} lost its job")
        now = time.monotonic()
        final = total > 0 and completed >= total
        if stage == self._last_stage and now - self._last_write < PROGRESS_WRITE_SECONDS and not final:
            return
        self._last_write, self._last_stage = now, stage
        with self.session() as session:
            try:
                report_progress(session, self.job_id, self.attempt, stage, completed, total)
            except CancelRequested:
                raise Cancelled() from None

    def succeed(self, session: Session) -> None:
        """Mark the job succeeded in ``session``'s transaction (with the results written in it); raises
        ``Cancelled`` or ``Superseded`` instead, and the caller's transaction rolls back, if the job was
        cancelled meanwhile or this attempt no longer owns it."""
        job = session.get(Job, self.job_id)
        try:
            finish(
                session,
                self.job_id,
                self.attempt,
                "succeeded",
                progress_total=job.progress_total if job is not None else 0,
            )
        except CancelRequested:
            raise Cancelled() from None
