"""Service configuration, read from ``ATTRIB_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class ConfigurationError(RuntimeError):
    """The environment describes an impossible configuration."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ATTRIB_", extra="ignore")

    data_dir: Path = Field(Path("./attrib-data"), description="Where the embedded default keeps its files.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite in the data directory.")
    broker_url: str | None = Field(None, description="Celery broker URL; default: SQLite in the data directory.")
    storage_dir: Path | None = Field(None, description="Blob storage root; default: <data_dir>/blobs.")
    api_key: str | None = Field(None, description="API key used by the CLI; default: <data_dir>/api-key.")

    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Largest accepted request body.")
    max_json_bytes: int = Field(16 * 1024**2, gt=0, description="Largest accepted JSON request body.")
    max_parameters: int = Field(100_000_000, gt=0, description="Largest accepted model (parameter count).")
    max_dataset_rows: int = Field(2_000_000, gt=0, description="Largest accepted dataset (examples).")
    max_dataset_bytes: int = Field(
        1024**3, gt=0, description="Largest accepted dataset once decompressed (checked from headers first)."
    )
    max_page_size: int = Field(1000, gt=0, description="Cap on page_size for lists and results.")
    max_top_k: int = Field(10_000, gt=0, description="Cap on top_k of an attribution.")
    max_activation_bytes: int = Field(
        16 * 1024**3, gt=0, description="Refuse jobs whose estimated activations for one batch exceed this."
    )

    # per-key rates and per-tenant quotas (see service/quotas.py); exceeding one answers 429 + Retry-After
    rate_limit_per_second: float = Field(50.0, gt=0, description="Average requests per second per API key.")
    rate_limit_burst: int = Field(200, ge=1, description="Requests an API key may make at once above the rate.")
    max_active_jobs_per_tenant: int = Field(32, ge=1, description="Queued plus running jobs per tenant.")
    max_stored_bytes_per_tenant: int = Field(
        100 * 1024**3, gt=0, description="Bytes of models, checkpoints and datasets a tenant may keep."
    )
    metrics_token: SecretStr | None = Field(
        None, description="Bearer token that unlocks GET /metrics (operators only); unset: /metrics is off."
    )

    # serving capacity (see service/admission.py)
    api_threads: int = Field(
        4, ge=1, le=1024, description="Threads that run the API's synchronous route code (few: they share one GIL)."
    )
    max_in_flight: int = Field(
        32, ge=1, le=1024, description="Requests admitted into the app at once; each may hold a DB connection."
    )
    max_waiting: int = Field(1024, ge=0, description="Requests that may wait for admission; beyond: 503.")
    keep_alive_seconds: int = Field(
        30,
        ge=1,
        le=3600,
        description="How long an idle HTTP connection stays open (above a load balancer's idle time).",
    )
    admission_wait_seconds: float = Field(
        10.0, gt=0, le=600, description="Longest wait for admission before a 503 with Retry-After."
    )

    # queues and devices (see service/queue.py, worker/devices.py)
    queue_prefix: str = Field(
        "",
        pattern=r"^[A-Za-z0-9_.:-]*$",
        max_length=64,
        description="Prefix of the broker's queue names (gpu, cpu), so that deployments can share a broker.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="Device of a worker's jobs: auto (CUDA when the pool process has it), cpu, cuda or cuda:N.",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="CPU threads of each pool process's torch (intra-op); default: torch's own (every core). "
        "Set it to cores / --concurrency when several pool processes run jobs on the CPU of one machine.",
    )
    fault_kill_before_publish: bool = Field(
        False,
        description="Tests only: the API process SIGKILLs itself after committing a job, before publishing "
        "it (see tests/service/test_topology.py).",
    )

    # job liveness
    job_heartbeat_seconds: float = Field(5.0, gt=0, description="How often a running job writes its heartbeat.")
    job_stale_seconds: float = Field(
        30.0, gt=0, description="A running job whose heartbeat is older than this has lost its worker."
    )
    job_max_attempts: int = Field(
        3, ge=1, description="Claims of one job by a worker; a job whose worker died this many times fails."
    )
    job_requeue_seconds: float = Field(
        60.0,
        gt=0,
        description="A queued job no worker claimed for this long is sent to the broker again "
        "(when the broker's queue is empty: its message may have been lost).",
    )
    job_reaper_seconds: float = Field(
        5.0, ge=0, description="Period of the reaper in the API and in each worker; 0 turns it off."
    )
    job_soft_time_limit_seconds: int = Field(
        6 * 3600, gt=0, description="A job running longer fails with a 'time limit' problem (Celery soft limit)."
    )
    job_time_limit_seconds: int = Field(
        6 * 3600 + 600, gt=0, description="A job's process is killed after this long (Celery hard limit)."
    )
    # sharded jobs (docs/jobs.md, "Sharded jobs")
    shard_examples: int = Field(
        50_000,
        ge=0,
        description="Training examples per shard of a sharded scoring job (influence with a factor "
        "strategy, gradient_similarity) or fit (kfac, ekfac, diagonal); a training set no larger than this "
        "runs as one task. 0 turns sharding off.",
    )
    shard_soft_time_limit_seconds: int = Field(
        3600,
        gt=0,
        description="A shard task running longer is stopped and its job fails with a 'time limit' "
        "problem (Celery soft limit of the shard task).",
    )
    shard_time_limit_seconds: int = Field(
        3900, gt=0, description="A shard task's process is killed after this long (Celery hard limit)."
    )
    merge_handoff_seconds: float = Field(
        60.0,
        gt=0,
        description="A sharded job's coordinator on a worker that does not consume the cpu queue sends the "
        "merge there and waits this long for a cpu worker to take it, then merges itself.",
    )
    broker_polling_seconds: float = Field(
        0.1,
        gt=0,
        le=5,
        description="How often workers poll the embedded default's SQLite broker for jobs (Redis needs no polling).",
    )
    broker_visibility_timeout_seconds: int = Field(
        7 * 3600,
        gt=0,
        description="Redis redelivers an unacknowledged message after this long; above the "
        "hard time limit so that a running job's message is never handed to a second worker.",
    )

    @model_validator(mode="after")
    def _database_and_broker_go_together(self) -> Settings:
        if (self.database_url is None) != (self.broker_url is None):
            raise ConfigurationError(
                "set both ATTRIB_DATABASE_URL and ATTRIB_BROKER_URL (production topology) or neither "
                "(embedded default: SQLite and a local worker)"
            )
        return self

    @model_validator(mode="after")
    def _job_liveness_limits_are_ordered(self) -> Settings:
        if self.job_stale_seconds <= self.job_heartbeat_seconds:
            raise ConfigurationError("ATTRIB_JOB_STALE_SECONDS must exceed ATTRIB_JOB_HEARTBEAT_SECONDS")
        if not self.job_soft_time_limit_seconds < self.job_time_limit_seconds < self.broker_visibility_timeout_seconds:
            raise ConfigurationError(
                "need ATTRIB_JOB_SOFT_TIME_LIMIT_SECONDS < ATTRIB_JOB_TIME_LIMIT_SECONDS < "
                "ATTRIB_BROKER_VISIBILITY_TIMEOUT_SECONDS"
            )
        if (
            not self.shard_soft_time_limit_seconds
            < self.shard_time_limit_seconds
            < self.broker_visibility_timeout_seconds
        ):
            raise ConfigurationError(
                "need ATTRIB_SHARD_SOFT_TIME_LIMIT_SECONDS < ATTRIB_SHARD_TIME_LIMIT_SECONDS < "
                "ATTRIB_BROKER_VISIBILITY_TIMEOUT_SECONDS"
            )
        return self

    @property
    def db_pool_size(self) -> int:
        """Connections for the API process: one per admitted request, and a few for background work."""
        return self.max_in_flight + 4

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def resolved_database_url(self) -> str:
        if self.database_url is not None:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'attrib.sqlite').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url is not None:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "blobs").resolve()

    @property
    def api_key_file(self) -> Path:
        return self.data_dir / "api-key"


@lru_cache
def get_settings() -> Settings:
    return Settings()
