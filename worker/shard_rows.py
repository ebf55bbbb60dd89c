"""The state changes of a job's shards (``job_shards`` rows), each one conditional UPDATE like the job's own
(`service.liveness`).

A shard is ``queued`` until a worker claims it (``running``, ``attempts`` + 1), then ``done`` with its output
blob, or ``failed`` with a problem. A running shard whose heartbeat is older than the job's stale time may be
claimed again: its worker died, and the new claim fences the old one out (every write of a shard's worker is
conditioned on its own attempt number), so a dead shard's partial output is never used. Shards are claimed
only while their job is ``running`` and not cancel-requested.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, or_, select, update
from sqlalchemy.orm import Session

from service.db.base import utcnow
from service.db.tables import Job, JobShard
from service.liveness import CancelRequested, LivenessPolicy, Superseded
from worker.attribution.shards import ShardRange


def create_shards(session: Session, job_id: str, ranges: Sequence[ShardRange], prepared: dict[str, Any]) -> None:
    for shard in ranges:
        session.add(
            JobShard(
                job_id=job_id,
                shard=shard.index,
                start=shard.start,
                stop=shard.stop,
                status="queued",
                attempts=0,
                progress_completed=0,
                progress_total=0,
                prepared=prepared,
            )
        )
    session.flush()


def shards_of(session: Session, job_id: str) -> list[JobShard]:
    return list(session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.shard)))


def _claimable(policy: LivenessPolicy, now: datetime) -> ColumnElement[bool]:
    stale = or_(JobShard.heartbeat_at.is_(None), JobShard.heartbeat_at < policy.stale_before(now))
    return or_(JobShard.status == "queued", and_(JobShard.status == "running", stale))


def job_accepts_work(session: Session, job_id: str) -> bool:
    job = session.get(Job, job_id, populate_existing=True)
    return job is not None and job.status == "running" and not job.cancel_requested


def claim_shard(
    session: Session,
    job_id: str,
    shard: int | None,
    policy: LivenessPolicy,
    worker: str,
    among: Collection[int] | None = None,
    last_first: bool = False,
) -> tuple[JobShard, int] | None:
    """Claim shard ``shard`` (or the first claimable one when None, of ``among`` when given; the last one with
    ``last_first``) of a running job: the shard row and this claim's attempt number, or None when there is
    nothing to do (done, running under a live worker, the job finished or cancelled, or another claim won the
    race)."""
    if not job_accepts_work(session, job_id):
        return None
    now = utcnow()
    order = JobShard.shard.desc() if last_first else JobShard.shard
    query = select(JobShard).where(JobShard.job_id == job_id, _claimable(policy, now)).order_by(order)
    if shard is not None:
        query = query.where(JobShard.shard == shard)
    if among is not None:
        query = query.where(JobShard.shard.in_(sorted(among)))
    for row in session.scalars(query.limit(8)).all():
        statement = (
            update(JobShard)
            .where(
                JobShard.job_id == job_id,
                JobShard.shard == row.shard,
                JobShard.attempts == row.attempts,
                _claimable(policy, now),
            )
            .values(
                status="running",
                attempts=row.attempts + 1,
                claimed_by=worker,
                heartbeat_at=now,
                progress_completed=0,
                error=None,
            )
        )
        if _changed(session, statement):
            session.refresh(row)
            return row, row.attempts
    return None


def _changed(session: Session, statement: Any) -> bool:
    result = cast(CursorResult[Any], session.execute(statement.execution_options(synchronize_session=False)))
    return result.rowcount == 1


def _owned(job_id: str, shard: int, attempt: int) -> list[ColumnElement[bool]]:
    return [
        JobShard.job_id == job_id,
        JobShard.shard == shard,
        JobShard.status == "running",
        JobShard.attempts == attempt,
    ]


def beat_shard(session: Session, job_id: str, shard: int, attempt: int) -> bool:
    """The shard's heartbeat; False when this attempt no longer owns the shard."""
    return _changed(session, update(JobShard).where(*_owned(job_id, shard, attempt)).values(heartbeat_at=utcnow()))


def report_shard_progress(session: Session, job_id: str, shard: int, attempt: int, completed: int, total: int) -> None:
    """Write the shard's progress (and heartbeat); raises ``Superseded`` when this attempt lost the shard and
    ``CancelRequested`` when the job was cancelled or ended meanwhile."""
    written = _changed(
        session,
        update(JobShard)
        .where(*_owned(job_id, shard, attempt))
        .values(progress_completed=completed, progress_total=total, heartbeat_at=utcnow()),
    )
    if not written:
        raise Superseded(f"job {job_id} shard {shard} attempt {attempt} no longer owns the shard")
    if not job_accepts_work(session, job_id):
        raise CancelRequested(job_id)


def finish_shard(session: Session, job_id: str, shard: int, attempt: int, output_sha256: str) -> None:
    """Mark the shard done with its output blob; raises ``Superseded`` if this attempt no longer owns it."""
    if not _changed(
        session,
        update(JobShard)
        .where(*_owned(job_id, shard, attempt))
        .values(status="done", output_sha256=output_sha256, heartbeat_at=utcnow()),
    ):
        raise Superseded(f"job {job_id} shard {shard} attempt {attempt} no longer owns the shard")


def fail_shard(session: Session, job_id: str, shard: int, attempt: int | None, error: dict[str, Any]) -> bool:
    """Mark the shard failed (its job then fails with ``error``); ``attempt`` None: whatever its attempt (the
    shard's process was killed by the hard time limit)."""
    expected = (
        _owned(job_id, shard, attempt)
        if attempt is not None
        else [JobShard.job_id == job_id, JobShard.shard == shard, JobShard.status == "running"]
    )
    return _changed(session, update(JobShard).where(*expected).values(status="failed", error=error))
