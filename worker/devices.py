"""The device a worker's pool process runs jobs on (``ATTRIB_DEVICE``).

- ``auto`` (default): CUDA when this process sees a GPU (`torch.cuda.is_available()`), else the CPU;
- ``cpu``; ``cuda`` (refuses to start without a GPU); ``cuda:N`` (that GPU).

With ``auto`` or ``cuda``, the pool processes of one worker spread over its GPUs: pool process ``i`` (Celery's
process index, stable when a process is replaced) uses GPU ``i mod count``, so ``attrib worker --concurrency N``
on a machine with N GPUs runs one process per GPU.

The choice is made in the pool process when it starts (`start_pool_process`, from Celery's
``worker_process_init``), never in the worker's parent: CUDA cannot be used in a process forked from one that
initialised it, so the parent (which imports torch before it forks) must not touch CUDA at all.
"""

from __future__ import annotations

import importlib
import logging
import os
import re

import torch

DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"

log = logging.getLogger(__name__)

_device: torch.device | None = None


class DeviceUnavailable(RuntimeError):
    """``ATTRIB_DEVICE`` names CUDA (or a GPU) that this process does not have."""


def choose_device(setting: str, process_index: int = 0) -> torch.device:
    """The device for ``setting`` in this process; only ``auto``, ``cuda`` and ``cuda:N`` ask CUDA anything."""
    if re.fullmatch(DEVICE_PATTERN, setting) is None:
        raise ValueError(f"ATTRIB_DEVICE must be auto, cpu, cuda or cuda:N, not {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if setting == "auto":
            return torch.device("cpu")
        raise DeviceUnavailable(f"ATTRIB_DEVICE={setting} but this worker has no CUDA device")
    count = torch.cuda.device_count()
    if setting in ("auto", "cuda"):
        return torch.device("cuda", process_index % count)
    device = torch.device(setting)
    if device.index is not None and device.index >= count:
        raise DeviceUnavailable(f"ATTRIB_DEVICE={setting} but this worker has {count} CUDA device(s)")
    return device


def pool_process_index() -> int:
    """Celery's index of the current pool process (0 outside a prefork pool). billiard (Celery's multiprocessing)
    ships no type information, hence the lookup by name."""
    process = importlib.import_module("billiard.process").current_process()
    index = getattr(process, "index", 0)
    return index if isinstance(index, int) else 0


def start_pool_process(setting: str, torch_threads: int | None = None) -> torch.device | None:
    """Choose this pool process's device once, make it CUDA's current device, set torch's CPU threads
    (``ATTRIB_TORCH_THREADS``; None keeps torch's default), and log both (None: ``setting`` names a GPU this
    process lacks; each job then fails, from `job_device`, with the reason)."""
    global _device
    index = pool_process_index()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        _device = choose_device(setting, index)
    except DeviceUnavailable as exc:
        log.error("attrib pool process %d: %s; the jobs it takes fail with this reason", os.getpid(), exc)
        return None
    if _device.type == "cuda":
        torch.cuda.set_device(_device)
    log.warning(
        "attrib pool process %d (index %d) runs jobs on %s, %d CPU threads",
        os.getpid(),
        index,
        _device,
        torch.get_num_threads(),
    )
    return _device


def job_device(setting: str) -> torch.device:
    """The device of this process's jobs: the pool process's choice, or (a job run in-process, as in tests and
    Celery's solo pool) the setting's choice for this process, made now."""
    global _device
    if _device is None:
        _device = choose_device(setting)
    return _device
