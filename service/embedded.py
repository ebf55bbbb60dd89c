"""The embedded default: SQLite, local blobs and one local Celery worker process (no Redis, no Postgres)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sqlalchemy import func, select

from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from service.db.tables import Job
from service.queue import QUEUES, broker_queues
from service.settings import Settings
from worker.sqlite_broker import declare_queues

LOCAL_TENANT = "local"


def prepare(settings: Settings) -> None:
    """Create the data directory, migrate the database, create the broker's queues (before the API and the
    worker race to), and make the first API key if there is none."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    declare_queues(settings.resolved_broker_url, broker_queues(QUEUES, settings.queue_prefix).split(","))
    ensure_api_key(settings)


def ensure_api_key(settings: Settings) -> Path:
    path = settings.api_key_file
    if path.exists():
        return path
    with session_scope(settings.resolved_database_url) as session:
        secret = create_api_key(session, LOCAL_TENANT)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    print(f"attrib: created an API key for tenant {LOCAL_TENANT!r} in {path.resolve()}", file=sys.stderr)
    return path


def read_api_key(settings: Settings) -> str:
    if settings.api_key:
        return settings.api_key
    path = settings.api_key_file
    if not path.exists():
        raise SystemExit(f"attrib: no API key: set ATTRIB_API_KEY or start `attrib serve` once to create {path}")
    return path.read_text().strip()


def serve_banner(settings: Settings, host: str, port: int) -> str:
    """What `attrib serve` says on start: where it listens, where the key is and how to use it elsewhere."""
    url = f"http://{host}:{port}"
    key_file = settings.api_key_file.resolve()
    return (
        f"attrib: serving on {url} (API docs {url}/docs, jobs and results {url}/ui/jobs); "
        f"data in {settings.data_dir.resolve()}\n"
        f"attrib: the API key is in {key_file}; in another terminal:\n"
        f'    export ATTRIB_URL={url} ATTRIB_API_KEY="$(cat {shlex.quote(str(key_file))})"'
    )


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM if `attrib serve` dies without cleaning up."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ATTRIB_DATA_DIR": str(settings.data_dir.resolve())}
    command = [
        sys.executable,
        "-m",
        "service.embedded_worker",
        "--quiet",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool=prefork",
        "--concurrency=1",
        f"--queues={broker_queues(QUEUES, settings.queue_prefix)}",
        "--loglevel=WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    # its own process group: a Ctrl-C in the terminal reaches `attrib serve` alone, which stops the worker (and
    # its pool process with it, `stop_worker`)
    return subprocess.Popen(
        command,
        env=env,
        start_new_session=True,
        preexec_fn=_die_with_parent if sys.platform == "linux" else None,
    )


def stop_worker(process: subprocess.Popen[bytes], idle: bool = False) -> None:
    """Stop the worker and its pool process. Idle (no job running), at once: Celery's warm shutdown of an idle
    worker only waits out its broker poll and its pool's threads (6-10 s). Otherwise a warm shutdown (the running
    job may finish) for up to 15 s, then SIGKILL; a job cut short is requeued by the reaper on the next start."""
    if process.poll() is not None:
        return
    if idle:
        _kill_group(process)
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        _kill_group(process)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the worker's own group (start_new_session): it and its pool
    process.wait()


def jobs_running(settings: Settings) -> bool:
    """Whether any job is running (in the embedded default: on this server's worker); True when unsure."""
    try:
        with session_scope(settings.resolved_database_url) as session:
            return bool(session.scalar(select(func.count()).select_from(Job).where(Job.status == "running")))
    except Exception:  # noqa: BLE001  (the safe answer: stop the worker warmly)
        return True


class WorkerSupervisor:
    """Keeps `attrib serve`'s worker process running: one that exits (killed, out of memory, a crash) is reported
    on stderr and started again, so that queued jobs never wait for a worker that is gone. A worker that dies
    soon after each start is restarted less and less often (up to once every ``MAX_BACKOFF_SECONDS``)."""

    MAX_BACKOFF_SECONDS = 30.0
    STABLE_SECONDS = 60.0  # a worker that ran this long before it exited is restarted at once

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        # the thread that starts the workers lives as long as they do: Linux's parent-death signal is sent when
        # the thread that forked a child ends, not only the process
        self._thread = threading.Thread(target=self._supervise, name="attrib-worker-supervisor", daemon=True)

    def start(self) -> WorkerSupervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            process = self.process
        if process is not None:
            stop_worker(process, idle=not jobs_running(self.settings))
        self._thread.join(timeout=30)

    def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            with self._lock:
                if self._stopping.is_set():
                    return
                started = time.monotonic()
                self.process = process = start_worker(self.settings)
            code = process.wait()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            backoff = 1.0 if ran >= self.STABLE_SECONDS else min(backoff * 2, self.MAX_BACKOFF_SECONDS)
            delay = 0.0 if ran >= self.STABLE_SECONDS else backoff
            self.restarts += 1
            print(
                f"attrib: the worker (pid {process.pid}) exited with code {code} after {ran:.0f} s; "
                f"starting another in {delay:g} s",
                file=sys.stderr,
                flush=True,
            )
            self._stopping.wait(delay)
