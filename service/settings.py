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
        30, ge=1, le=3600, description="How long an idle HTTP connection stays open (above a load balancer's idle time)."
    )
    admission_wait_seconds: float = Field(
        10.0, gt=0, le=600, description="Longest wait for admission before a 503 with Retry-After."
    )

    @model_validator(mode="after")
    def _database_and_broker_go_together(self) -> "Settings":
        if (self.database_url is None) != (self.broker_url is None):
            raise ConfigurationError(
                "set both ATTRIB_DATABASE_URL and ATTRIB_BROKER_URL (production topology) or neither "
                "(embedded default: SQLite and a local worker)"
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
