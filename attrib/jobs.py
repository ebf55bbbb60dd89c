"""Following a job: ``job.wait()`` polls it to the end with a tqdm progress bar."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from attrib.errors import JobFailed
from attrib.resources import JobState

if TYPE_CHECKING:
    from attrib.async_client import AsyncClient
    from attrib.client import Client

POLL_SECONDS = 0.5


class ProgressBar:
    """One tqdm bar that follows a job: its description is the current stage, restarted at each new stage."""

    FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    FORMAT_NO_TOTAL = "{desc}{n_fmt} [{elapsed}{postfix}]"

    def __init__(self, job_id: str, enabled: bool) -> None:
        self.job_id = job_id
        self.enabled = enabled
        self.bar: Any = None
        self.stage: str | None = None

    def show(self, state: JobState) -> None:
        if not self.enabled:
            return
        progress = state.progress
        if self.bar is None:
            self.bar = tqdm(file=sys.stderr, unit="step", dynamic_ncols=True)
        if progress.stage != self.stage:
            self.stage = progress.stage
            self.bar.reset(total=progress.total or None)
            self.bar.bar_format = self.FORMAT if progress.total else self.FORMAT_NO_TOTAL
            self.bar.set_description(f"{self.job_id} {progress.stage}", refresh=False)
        if progress.total and self.bar.total != progress.total:
            self.bar.total = progress.total
        self.bar.n = progress.completed
        self.bar.set_postfix_str(state.status, refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def finished_or_raise(state: JobState, raise_on_failure: bool) -> JobState:
    if raise_on_failure and state.status != "succeeded":
        raise JobFailed(state)
    return state


def timed_out(started: float, timeout: float | None) -> bool:
    return timeout is not None and time.monotonic() - started > timeout


class Job:
    """A job on the server. ``wait()`` follows it to the end.

    >>> attribution = client.attribute(model, train, queries, top_k=10)
    >>> attribution.job.wait()          # a progress bar on stderr; raises JobFailed if it fails
    JobState(id='job_…', kind='attribution', status='succeeded', …)
    """

    def __init__(self, client: Client, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def state(self) -> JobState:
        """The job as the API describes it now."""
        return self.client.get_job(self.id)

    def cancel(self) -> JobState:
        """Ask the server to cancel the job (a queued job stops at once, a running one at its next step)."""
        return self.client.cancel_job(self.id)

    def wait(self, *, progress: bool = True, timeout: float | None = None, raise_on_failure: bool = True) -> JobState:
        """Poll until the job finishes; show a tqdm bar on stderr unless ``progress=False``.

        Raises :class:`attrib.JobFailed` if it fails or is cancelled (unless ``raise_on_failure=False``) and
        :class:`TimeoutError` after ``timeout`` seconds (the job keeps running on the server).
        """
        bar = ProgressBar(self.id, progress)
        started = time.monotonic()
        try:
            while True:
                state = self.state()
                bar.show(state)
                if state.finished:
                    return finished_or_raise(state, raise_on_failure)
                if timed_out(started, timeout):
                    raise TimeoutError(f"job {self.id} is still {state.status} after {timeout} s")
                time.sleep(POLL_SECONDS)
        finally:
            bar.close()


class AsyncJob:
    """The async twin of :class:`Job`: ``await job.wait()``."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self.client = client
        self.id = job_id

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def state(self) -> JobState:
        return await self.client.get_job(self.id)

    async def cancel(self) -> JobState:
        return await self.client.cancel_job(self.id)

    async def wait(
        self, *, progress: bool = True, timeout: float | None = None, raise_on_failure: bool = True
    ) -> JobState:
        bar = ProgressBar(self.id, progress)
        started = time.monotonic()
        try:
            while True:
                state = await self.state()
                bar.show(state)
                if state.finished:
                    return finished_or_raise(state, raise_on_failure)
                if timed_out(started, timeout):
                    raise TimeoutError(f"job {self.id} is still {state.status} after {timeout} s")
                await asyncio.sleep(POLL_SECONDS)
        finally:
            bar.close()
