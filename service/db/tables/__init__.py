"""One module per table; importing this package registers them all on ``Base.metadata``."""

from service.db.tables.api_key import ApiKey
from service.db.tables.attribution import Attribution
from service.db.tables.blob import Blob
from service.db.tables.checkpoint import Checkpoint
from service.db.tables.dataset import Dataset
from service.db.tables.edit import Edit
from service.db.tables.fit import Fit
from service.db.tables.idempotency import IdempotentResponse
from service.db.tables.job import FINISHED_STATUSES, JOB_STATUSES, Job, JobKind, JobStatus
from service.db.tables.job_shard import SHARD_STATUSES, JobShard
from service.db.tables.model import Model
from service.db.tables.result import AttributionQuery, ResultChunk
from service.db.tables.tenant import Tenant

__all__ = [
    "FINISHED_STATUSES",
    "JOB_STATUSES",
    "SHARD_STATUSES",
    "ApiKey",
    "Attribution",
    "AttributionQuery",
    "Blob",
    "Checkpoint",
    "Dataset",
    "Edit",
    "Fit",
    "IdempotentResponse",
    "Job",
    "JobKind",
    "JobShard",
    "JobStatus",
    "Model",
    "ResultChunk",
    "Tenant",
]
