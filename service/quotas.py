"""Per-key request rates and per-tenant quotas (active jobs, stored bytes): 429 + Retry-After when exceeded.

Rates are counted per API process (a token bucket per key, in memory): with several API processes behind a load
balancer, a key's effective rate is at most the setting times the number of processes. Quotas are read from the
database at the moment of the request, so they hold across processes (two requests racing at the very edge of a
quota may both pass).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.tables import Blob, Checkpoint, Dataset, Job, Model
from service.problems import ProblemError

ACTIVE_STATUSES = ("queued", "running")
JOB_QUOTA_RETRY_SECONDS = 10
STORAGE_QUOTA_RETRY_SECONDS = 3600


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets: ``rate`` requests per second on average, bursts of up to ``burst``, per key."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self.buckets: dict[str, _Bucket] = {}
        self.lock = threading.Lock()

    def check(self, key: str) -> None:
        """Take one token for ``key``, or raise a 429 saying when the next one is due."""
        now = time.monotonic()
        with self.lock:
            bucket = self.buckets.get(key)
            if bucket is None:
                if len(self.buckets) > 100_000:
                    self.buckets.clear()
                bucket = self.buckets[key] = _Bucket(tokens=float(self.burst), updated=now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1:
                bucket.tokens -= 1
                return
            wait = (1 - bucket.tokens) / self.rate
        raise ProblemError(
            429,
            f"too many requests for this API key (at most {self.rate:g}/s, bursts of "
            f"{self.burst}); retry after the time in Retry-After",
            kind="rate-limited",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )


def check_active_jobs(session: Session, tenant_id: str, limit: int) -> None:
    active = (
        session.scalar(
            select(func.count()).select_from(Job).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))
        )
        or 0
    )
    if active >= limit:
        raise ProblemError(
            429,
            f"this tenant already has {active} queued or running jobs (at most {limit}); wait for some to finish",
            kind="job-quota-exceeded",
            headers={"Retry-After": str(JOB_QUOTA_RETRY_SECONDS)},
        )


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Bytes of the tenant's live models, checkpoints and datasets (each blob counted once per use)."""
    models = (
        select(func.coalesce(func.sum(Blob.size), 0))
        .join(Model, Model.weights_sha256 == Blob.sha256)
        .where(Model.tenant_id == tenant_id, Model.deleted_at.is_(None))
    )
    checkpoints = (
        select(func.coalesce(func.sum(Blob.size), 0))
        .join(Checkpoint, Checkpoint.weights_sha256 == Blob.sha256)
        .join(Model, Model.id == Checkpoint.model_id)
        .where(Model.tenant_id == tenant_id, Model.deleted_at.is_(None))
    )
    datasets = (
        select(func.coalesce(func.sum(Blob.size), 0))
        .join(Dataset, Dataset.blob_sha256 == Blob.sha256)
        .where(Dataset.tenant_id == tenant_id, Dataset.deleted_at.is_(None))
    )
    return sum(int(session.scalar(query) or 0) for query in (models, checkpoints, datasets))


def check_storage(session: Session, tenant_id: str, new_bytes: int, limit: int) -> None:
    used = stored_bytes(session, tenant_id)
    if used + new_bytes > limit:
        raise ProblemError(
            429,
            f"this upload ({new_bytes:,} bytes) would take the tenant's stored models, "
            f"checkpoints and datasets to {used + new_bytes:,} bytes (quota {limit:,}); delete "
            "some first",
            kind="storage-quota-exceeded",
            headers={"Retry-After": str(STORAGE_QUOTA_RETRY_SECONDS)},
        )
