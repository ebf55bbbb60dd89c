"""Queues by job kind, `attrib worker --queues/--concurrency`, queue depth on /metrics, and the device of a job:
chosen in the pool process, never in the worker's parent (which must not initialise CUDA before it forks)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch
from celery import signals
from pydantic import SecretStr

from service.cli import build_parser, worker_argv
from service.queue import QUEUE_OF_KIND, QUEUE_OF_STEP, QUEUES, CeleryQueue, queue_for
from service.settings import Settings, get_settings
from tests.conftest import REDIS_URL, require_server
from tests.service.conftest import Api
from worker import devices
from worker.devices import DeviceUnavailable, choose_device


def test_every_job_kind_has_a_queue_and_models_run_on_the_gpu_queue() -> None:
    assert set(QUEUES) == {"gpu", "cpu"}
    assert {kind: queue_for(kind) for kind in ("fit", "attribution", "edit")} == {
        "fit": "gpu",
        "attribution": "gpu",
        "edit": "gpu",
    }
    assert set(QUEUE_OF_KIND.values()) <= set(QUEUES)
    assert QUEUE_OF_STEP == {"shard": "gpu", "merge": "cpu"}  # a sharded job's merge goes to the cpu queue
    with pytest.raises(ValueError, match="no queue for job kind 'nope'"):
        queue_for("nope")


def worker_args(*argv: str) -> Any:
    return build_parser().parse_args(["worker", *argv])


def test_attrib_worker_consumes_the_queues_it_is_given_under_the_prefix() -> None:
    settings = Settings(queue_prefix="blue.")
    argv = worker_argv(worker_args("--queues", "gpu", "--concurrency", "4"), settings)
    assert argv[:4] == ["worker", "--pool=prefork", "--concurrency=4", "--queues=blue.gpu"]
    assert worker_argv(worker_args(), Settings())[2:4] == ["--concurrency=1", "--queues=gpu,cpu"]
    for bad in (["--queues", "gpu,tpu"], ["--queues", ","], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            worker_argv(worker_args(*bad), settings)


@pytest.fixture
def redis_queue() -> Iterator[CeleryQueue]:
    require_server("Redis", 6379)
    prefix = f"attrib-test-{uuid.uuid4().hex[:8]}."
    yield CeleryQueue(REDIS_URL, queue_prefix=prefix)
    redis.Redis.from_url(REDIS_URL).delete(*(f"{prefix}{queue}" for queue in QUEUES))


@pytest.mark.redis
def test_jobs_are_published_to_the_queue_of_their_kind(redis_queue: CeleryQueue) -> None:
    assert redis_queue.backlogs() == {"gpu": 0, "cpu": 0}
    redis_queue.enqueue("job_a", "fit")
    redis_queue.enqueue("job_b", "attribution")
    client = redis.Redis.from_url(REDIS_URL)
    assert client.llen(f"{redis_queue.queue_prefix}gpu") == 2
    assert redis_queue.backlogs() == {"gpu": 2, "cpu": 0} and redis_queue.backlog() == 2


def test_metrics_report_the_depth_of_each_queue(sqlite_api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_api.settings, "metrics_token", SecretStr("operator-secret"))
    operator = {"Authorization": "Bearer operator-secret"}
    monkeypatch.setattr(sqlite_api.queue, "backlogs", lambda: {"gpu": 3, "cpu": 1})
    text = sqlite_api.client.get("/metrics", headers=operator).text
    assert 'attrib_queue_messages{queue="gpu"} 3.0' in text and 'attrib_queue_messages{queue="cpu"} 1.0' in text
    assert "attrib_broker_up 1.0" in text

    def broker_down() -> dict[str, int]:
        raise ConnectionError("broker down")

    monkeypatch.setattr(sqlite_api.queue, "backlogs", broker_down)
    text = sqlite_api.client.get("/metrics", headers=operator).text
    assert "attrib_broker_up 0.0" in text and "attrib_queue_messages{" not in text


class CudaProbe:
    """Stands in for torch.cuda: ``available`` GPUs, and a record of every call that would touch CUDA."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int, forbidden: bool = False) -> None:
        self.calls: list[str] = []
        for name, value in (
            ("is_available", count > 0),
            ("device_count", count),
            ("set_device", None),
            ("init", None),
            ("_lazy_init", None),
            ("current_device", 0),
        ):
            monkeypatch.setattr(torch.cuda, name, self._recording(name, value, forbidden))

    def _recording(self, name: str, value: Any, forbidden: bool) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            if forbidden:
                raise AssertionError(f"torch.cuda.{name}() called in the worker's parent process")
            return value

        return call


def test_the_device_setting_picks_cpu_or_a_gpu_per_pool_process(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CudaProbe(monkeypatch, count=0)
    assert choose_device("cpu") == torch.device("cpu") and probe.calls == []  # cpu never asks CUDA anything
    assert choose_device("auto", 3) == torch.device("cpu")
    with pytest.raises(DeviceUnavailable):
        choose_device("cuda")
    with pytest.raises(ValueError):
        choose_device("tpu")

    CudaProbe(monkeypatch, count=2)
    assert [choose_device("auto", index) for index in range(3)] == [
        torch.device("cuda", 0),
        torch.device("cuda", 1),
        torch.device("cuda", 0),
    ]
    assert choose_device("cuda", 1) == torch.device("cuda", 1)
    assert choose_device("cuda:1", 0) == torch.device("cuda", 1)
    with pytest.raises(DeviceUnavailable):
        choose_device("cuda:2")
    with pytest.raises(ValueError):
        Settings(device="gpu")


def test_a_pool_process_makes_its_gpu_current(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = CudaProbe(monkeypatch, count=4)
    monkeypatch.setattr(devices, "pool_process_index", lambda: 6)
    monkeypatch.setattr(devices, "_device", None)
    assert devices.start_pool_process("auto") == torch.device("cuda", 2)
    assert "set_device" in probe.calls and devices.job_device("cpu") == torch.device("cuda", 2)


def test_the_worker_parent_never_touches_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `attrib worker` runs in its parent process before the pool forks: the command line, and Celery's
    worker_init handlers (which import the runner, the tasks and torch). Any CUDA call there fails the test."""
    probe = CudaProbe(monkeypatch, count=1, forbidden=True)
    monkeypatch.setattr(devices, "_device", None)
    worker_argv(worker_args("--queues", "gpu"), Settings())
    import worker.celery_app  # noqa: F401  (connects the app's signal handlers, as `attrib worker` does)

    signals.worker_init.send(sender=None)
    assert probe.calls == [] and devices._device is None and not torch.cuda.is_initialized()


def test_a_pool_process_takes_its_cpu_threads_from_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """ATTRIB_TORCH_THREADS, applied by the handler Celery runs in each new pool process (worker_process_init);
    unset, torch keeps its own default."""
    import worker.celery_app  # noqa: F401  (connects the app's signal handlers, as `attrib worker` does)

    default = torch.get_num_threads()
    monkeypatch.setattr(devices, "_device", None)
    monkeypatch.setenv("ATTRIB_DEVICE", "cpu")
    try:
        for threads, expected in (("1", 1), (None, 1), ("2", 2)):
            if threads is None:
                monkeypatch.delenv("ATTRIB_TORCH_THREADS", raising=False)
            else:
                monkeypatch.setenv("ATTRIB_TORCH_THREADS", threads)
            get_settings.cache_clear()
            signals.worker_process_init.send(sender=None)
            assert torch.get_num_threads() == expected  # unset: whatever the process had
    finally:
        get_settings.cache_clear()
        torch.set_num_threads(default)
    with pytest.raises(ValueError):
        Settings(torch_threads=0)


def test_a_job_on_a_worker_without_the_gpu_it_was_told_to_use_fails_with_the_reason(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    CudaProbe(monkeypatch, count=0)
    monkeypatch.setattr(devices, "_device", None)
    assert devices.start_pool_process("cuda") is None
    monkeypatch.setattr(sqlite_api.settings, "device", "cuda")
    from tests.service.test_attributions import setup_job, submit

    job = sqlite_api.client.get(f"/v1/jobs/{submit(sqlite_api, setup_job(sqlite_api))['job_id']}").json()
    assert (
        job["status"] == "failed" and "ATTRIB_DEVICE=cuda but this worker has no CUDA device" in job["error"]["detail"]
    )
