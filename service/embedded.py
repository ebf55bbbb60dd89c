"""The embedded default: SQLite, local blobs and one local Celery worker process (no Redis, no Postgres)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from service.auth import create_api_key
from service.db.migrate import upgrade_to_head
from service.db.session import session_scope
from service.queue import QUEUES, broker_queues
from service.settings import Settings

LOCAL_TENANT = "local"


def prepare(settings: Settings) -> None:
    """Create the data directory, migrate the database, and make the first API key if there is none."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
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
    return subprocess.Popen(command, env=env, preexec_fn=_die_with_parent if sys.platform == "linux" else None)


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
