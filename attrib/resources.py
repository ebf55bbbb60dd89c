"""What the API returns, as small typed records (each keeps the full JSON in ``raw``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


@dataclass(frozen=True)
class Model:
    id: str
    name: str
    format: str
    num_parameters: int
    tracked_layers: list[str]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Model:
        return cls(
            data["id"], data["name"], data["format"], data["num_parameters"], list(data.get("tracked_layers", [])), data
        )


@dataclass(frozen=True)
class Dataset:
    id: str
    name: str
    num_examples: int
    fields: dict[str, dict[str, Any]]
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Dataset:
        return cls(data["id"], data["name"], data["num_examples"], dict(data.get("fields", {})), data)


@dataclass(frozen=True)
class Checkpoint:
    id: str
    model_id: str
    step: int
    stage: int
    raw: dict[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(data["id"], data["model_id"], data["step"], data.get("stage", 0), data)


@dataclass(frozen=True)
class Progress:
    stage: str
    completed: int
    total: int


@dataclass(frozen=True)
class JobState:
    """A job as the API last described it."""

    id: str
    kind: str
    status: str
    progress: Progress
    error: dict[str, Any] | None
    result_url: str | None
    raw: dict[str, Any] = field(repr=False)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobState:
        progress = data.get("progress") or {}
        return cls(
            data["id"],
            data["kind"],
            data["status"],
            Progress(str(progress.get("stage", "")), int(progress.get("completed", 0)), int(progress.get("total", 0))),
            data.get("error"),
            data.get("result_url"),
            data,
        )


@dataclass(frozen=True)
class ResultRow:
    """One ranked row: ``score`` > 0 means the training example helps the query."""

    query_id: int | str | None
    direction: str
    rank: int
    train_id: int | str
    score: float
    task: int | None = None
    split: int | None = None
    query_token: int | None = None  # per-token attributions: the token's position in its query
    query_token_text: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ResultRow:
        return cls(
            data.get("query_id"),
            data["direction"],
            data["rank"],
            data["train_id"],
            data["score"],
            data.get("task"),
            data.get("split"),
            data.get("query_token"),
            data.get("query_token_text"),
        )


@dataclass(frozen=True)
class Attribution:
    """A submitted attribution. ``job`` follows the job computing it: ``attribution.job.wait()``."""

    id: str
    job_id: str
    status: str
    method: str
    mode: str
    top_k: int
    train_dataset_id: str
    query_dataset_id: str | None
    raw: dict[str, Any] = field(repr=False)
    job: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], job: Any = None) -> Attribution:
        return cls(
            data["id"],
            data["job_id"],
            data["status"],
            data["method"],
            data["mode"],
            data["top_k"],
            data["train_dataset_id"],
            data.get("query_dataset_id"),
            data,
            job,
        )


@dataclass(frozen=True)
class Fit:
    id: str
    job_id: str
    raw: dict[str, Any] = field(repr=False)
    job: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict[str, Any], job: Any = None) -> Fit:
        return cls(data["id"], data["job_id"], data, job)
