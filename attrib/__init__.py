"""The attrib Python SDK: ``from attrib import Client`` (or ``AsyncClient``).

>>> from attrib import Client
>>> client = Client()   # ATTRIB_URL, and ATTRIB_API_KEY or the key file `attrib serve` writes
>>> attribution = client.attribute(model, train, queries, top_k=10)
>>> attribution.job.wait()
>>> for row in client.results(attribution):
...     print(row.query_id, row.rank, row.train_id, row.score)
"""

from attrib.async_client import AsyncClient
from attrib.client import Client
from attrib.errors import (
    ApiError,
    AttribError,
    BadRequest,
    ConfigurationError,
    Conflict,
    ConnectionFailed,
    FieldError,
    InvalidInput,
    JobFailed,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from attrib.jobs import AsyncJob, Job
from attrib.resources import Attribution, Checkpoint, Dataset, Fit, JobState, Model, ResultRow
from attrib.transport import RetryPolicy

__all__ = [
    "ApiError",
    "AsyncClient",
    "AsyncJob",
    "AttribError",
    "Attribution",
    "BadRequest",
    "Checkpoint",
    "Client",
    "ConfigurationError",
    "Conflict",
    "ConnectionFailed",
    "Dataset",
    "FieldError",
    "Fit",
    "InvalidInput",
    "Job",
    "JobFailed",
    "JobState",
    "Model",
    "NotFound",
    "PayloadTooLarge",
    "ResultRow",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "UnsupportedMediaType",
]
