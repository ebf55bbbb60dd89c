"""The heartbeat of a running job: a thread that writes ``heartbeat_at`` every few seconds, apart from the work.

It has its own thread and its own database sessions, so a job busy in one long engine call still shows that
its worker is alive; when the worker process dies, the heartbeat stops with it and the reaper takes over. When a
write finds that this attempt no longer owns the job (it was presumed dead, then requeued or ended), ``lost``
is set and the work stops at its next progress report.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import TracebackType

from sqlalchemy.orm import Session

from service.db.session import session_scope
from service.liveness import beat

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        database_url: str,
        job_id: str,
        attempt: int,
        period: float,
        beat_once: Callable[[Session], bool] | None = None,
    ) -> None:
        """``beat_once(session)`` writes one heartbeat and says whether the attempt still owns its work (default:
        the job's own heartbeat; a shard passes its shard row's)."""
        self.database_url, self.job_id, self.attempt, self.period = database_url, job_id, attempt, period
        self.beat_once = beat_once or (lambda session: beat(session, job_id, attempt))
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=max(self.period, 5.0))

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                with session_scope(self.database_url) as session:
                    owned = self.beat_once(session)
            except Exception as exc:  # noqa: BLE001  (a database hiccup: try again next period)
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
                continue
            if not owned:
                log.warning("job %s attempt %d no longer owns its job; stopping it", self.job_id, self.attempt)
                self.lost.set()
                return
