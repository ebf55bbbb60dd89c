"""`attrib`: serve, worker, migrate, keys create, demo; the client verbs live in `attrib.cli_verbs`."""

from __future__ import annotations

import argparse
import os
import sys

from attrib.cli_verbs import HelpFormatter, add_client_verbs
from service.queue import QUEUES, broker_queues
from service.settings import ConfigurationError, Settings


def load_settings() -> Settings:
    try:
        return Settings()
    except (ConfigurationError, ValueError) as exc:
        raise SystemExit(f"attrib: configuration error: {exc}") from exc


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service import embedded
    from service.app import create_app

    settings = load_settings()
    if not settings.embedded:
        # the app is built in each process (from the same ATTRIB_* environment) when there are several
        target = create_app(settings, freeze_heap=True) if args.workers == 1 else "service.app:create_served_app"
        uvicorn.run(
            target,
            factory=args.workers > 1,
            workers=args.workers,
            host=args.host,
            port=args.port,
            timeout_keep_alive=settings.keep_alive_seconds,
        )
        return
    if args.workers != 1:
        raise SystemExit(
            "attrib: --workers needs the production topology (ATTRIB_DATABASE_URL and "
            "ATTRIB_BROKER_URL); the embedded default serves from one process"
        )
    embedded.prepare(settings)
    app = create_app(settings, freeze_heap=True)  # its reaper requeues the jobs a previous run left running
    worker = embedded.WorkerSupervisor(settings).start()
    print(embedded.serve_banner(settings, args.host, args.port), file=sys.stderr)
    try:
        uvicorn.run(
            app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=settings.keep_alive_seconds
        )
    finally:
        worker.stop()


def worker_argv(args: argparse.Namespace, settings: Settings) -> list[str]:
    """Celery's worker command line for `attrib worker`: the prefork pool (the parent forks, never touches CUDA,
    and replaces a pool process that dies), the chosen queues under ``ATTRIB_QUEUE_PREFIX``, and a node name
    unique on the host so that several workers can run side by side."""
    queues = parse_queues(args.queues)
    if args.concurrency < 1:
        raise SystemExit("attrib: --concurrency must be at least 1")
    return [
        "worker",
        "--pool=prefork",
        f"--concurrency={args.concurrency}",
        f"--queues={broker_queues(queues, settings.queue_prefix)}",
        f"--hostname={'-'.join(queues)}-{os.getpid()}@%h",
        f"--loglevel={args.loglevel}",
    ]


def parse_queues(value: str) -> list[str]:
    queues = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in queues if name not in QUEUES]
    if not queues or unknown:
        raise SystemExit(f"attrib: --queues takes a comma-separated list of {', '.join(QUEUES)}, not {value!r}")
    return list(dict.fromkeys(queues))


def cmd_worker(args: argparse.Namespace) -> None:
    settings = load_settings()
    argv = worker_argv(args, settings)
    from worker.celery_app import app, run_reaper_in_pool_processes

    run_reaper_in_pool_processes(app)
    app.worker_main(argv)


def cmd_migrate(args: argparse.Namespace) -> None:
    from service.db.migrate import upgrade_to_head

    settings = load_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.resolved_database_url)
    print("attrib: database is at the latest schema", file=sys.stderr)


def cmd_keys_create(args: argparse.Namespace) -> None:
    from service.auth import create_api_key
    from service.db.migrate import upgrade_to_head
    from service.db.session import session_scope

    settings = load_settings()
    if settings.embedded:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        upgrade_to_head(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        secret = create_api_key(session, args.tenant)
    print(secret)


def cmd_demo(args: argparse.Namespace) -> None:
    from service.demo import run_demo

    run_demo(port=args.port, keep=args.keep, method=args.method)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attrib", description="Training-data attribution service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the API (and, by default, a local worker)", formatter_class=HelpFormatter
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (production topology only); each runs ATTRIB_API_THREADS threads and "
        "admits ATTRIB_MAX_IN_FLIGHT requests",
    )
    serve.set_defaults(func=cmd_serve)

    worker = commands.add_parser(
        "worker", help="run a Celery worker (production topology)", formatter_class=HelpFormatter
    )
    worker.add_argument(
        "--queues",
        default=",".join(QUEUES),
        help="queues to consume: gpu (fits, scoring, edits), cpu (merges, housekeeping), or both",
    )
    worker.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="pool processes, each running one job at a time; with GPUs, one per GPU (pool "
        "process i uses GPU i mod count, see ATTRIB_DEVICE)",
    )
    worker.add_argument("--loglevel", default="INFO", help="Celery log level")
    worker.set_defaults(func=cmd_worker)

    migrate = commands.add_parser("migrate", help="upgrade the database to the latest schema")
    migrate.set_defaults(func=cmd_migrate)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", help="create a tenant if needed and print a new API key")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    create.set_defaults(func=cmd_keys_create)

    demo = commands.add_parser(
        "demo", help="train a small model on digits and attribute its predictions", formatter_class=HelpFormatter
    )
    demo.add_argument("--port", type=int, default=8765, help="port of the demo's own embedded server")
    demo.add_argument("--keep", action="store_true", help="leave the embedded server running afterwards")
    demo.add_argument("--method", default="influence", help="attribution method (default: influence, EK-FAC)")
    demo.set_defaults(func=cmd_demo)

    add_client_verbs(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
