"""Client verbs of the `attrib` command, on the Python SDK: models / datasets upload, attribute, jobs, results,
export, edit. Human tables on a terminal, JSON with ``--json``.

Exit codes (for scripts):
  0  success
  1  the job failed or was cancelled
  2  bad command line (argparse)
  3  the API refused the request (4xx: invalid input, conflict, too large, ...)
  4  not found (404)
  5  no API key, or the key was refused (401)
  6  the server could not be reached, or answered 5xx after retries
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from attrib.client import Client
from attrib.config import DEFAULT_URL
from attrib.errors import (
    ApiError,
    ConfigurationError,
    ConnectionFailed,
    JobFailed,
    NotFound,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
)

EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_NOT_FOUND, EXIT_AUTH, EXIT_UNAVAILABLE = 1, 3, 4, 5, 6
EXIT_CODES = """exit codes: 0 success, 1 job failed or cancelled, 2 bad command line, 3 request refused (4xx),
4 not found, 5 no API key or key refused, 6 server unreachable or 5xx"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's help shows its default, except flags (off unless given) and options with no default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


Handler = Callable[[Client, argparse.Namespace], int]


# ------------------------------------------------------------------------------------------ output


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """An aligned text table of the given columns."""
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for line in cells:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def show(raw: dict[str, Any], args: argparse.Namespace, fields: Sequence[str]) -> None:
    """A resource: its JSON with --json, else `field: value` lines."""
    if args.json:
        print_json(raw)
        return
    width = max(len(name) for name in fields) + 2
    for name in fields:
        value = raw.get(name)
        print(f"{name + ':':<{width}}{json.dumps(value) if isinstance(value, (dict, list)) else value}")


def json_argument(value: str) -> Any:
    """Inline JSON (starting with `{` or `[`) or the path of a JSON file."""
    try:
        text = value if value.lstrip().startswith(("{", "[")) else Path(value).read_text()
        return json.loads(text)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"not inline JSON, and not a readable file: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


# ------------------------------------------------------------------------------------------ verbs

MODEL_FIELDS = ("id", "name", "format", "num_parameters", "tracked_layers", "created_at")
DATASET_FIELDS = ("id", "name", "num_examples", "fields", "created_at")
JOB_FIELDS = (
    "id",
    "kind",
    "status",
    "progress",
    "error",
    "result_url",
    "attribution_id",
    "fit_id",
    "created_at",
    "finished_at",
)
ATTRIBUTION_FIELDS = (
    "id",
    "job_id",
    "status",
    "method",
    "mode",
    "top_k",
    "train_dataset_id",
    "query_dataset_id",
    "results_url",
)


def models_upload(client: Client, args: argparse.Namespace) -> int:
    model = client.upload_model(
        args.weights, name=args.name, architecture=args.architecture, loss=args.loss, format=args.format
    )
    show(model.raw, args, MODEL_FIELDS)
    return 0


def datasets_upload(client: Client, args: argparse.Namespace) -> int:
    dataset = client.upload_dataset(args.file, name=args.name)
    show(dataset.raw, args, DATASET_FIELDS)
    return 0


def attribute(client: Client, args: argparse.Namespace) -> int:
    models = args.model if len(args.model) > 1 else args.model[0]
    attribution = client.attribute(
        models,
        args.train,
        args.queries,
        method=args.method,
        mode=args.mode,
        measurement=args.measurement,
        top_k=args.top_k,
        fit=args.fit,
        options=args.options,
    )
    status = 0
    if not args.no_wait:
        if not args.json:
            print(f"attribution {attribution.id}: following job {attribution.job_id}", file=sys.stderr)
        state = attribution.job.wait(progress=not args.json, raise_on_failure=False)
        if state.status != "succeeded":
            detail = (state.error or {}).get("detail", "")
            print(f"attrib: job {state.id} {state.status}: {detail}", file=sys.stderr)
            status = EXIT_JOB_FAILED
        attribution = client.get_attribution(attribution.id)
    show(attribution.raw, args, ATTRIBUTION_FIELDS)
    if status == 0 and attribution.status == "succeeded" and not args.json:
        print(f"results page: {client.results_page_url(attribution)}")
    return status


def jobs_show(client: Client, args: argparse.Namespace) -> int:
    show(client.get_job(args.job).raw, args, JOB_FIELDS)
    return 0


def jobs_cancel(client: Client, args: argparse.Namespace) -> int:
    show(client.cancel_job(args.job).raw, args, JOB_FIELDS)
    return 0


RESULT_COLUMNS = ("query_id", "direction", "rank", "train_id", "score")


def result_rows(client: Client, args: argparse.Namespace) -> list[dict[str, Any]]:
    directions = ["positive", "negative"] if args.direction == "both" else [args.direction]
    rows: list[dict[str, Any]] = []
    for direction in directions:
        for row in client.results(args.attribution, query_id=args.query, direction=direction):
            if args.limit is None or row.rank <= args.limit:
                rows.append({k: v for k, v in vars(row).items() if v is not None or k == "query_id"})
    return rows


def results(client: Client, args: argparse.Namespace) -> int:
    rows = result_rows(client, args)
    fmt = "json" if args.json else args.format
    if fmt == "json":
        print_json(rows)
    elif fmt == "csv":
        columns = list(dict.fromkeys(k for row in rows for k in row)) or list(RESULT_COLUMNS)
        print(",".join(columns))
        for row in rows:
            print(",".join(csv_cell(row.get(c)) for c in columns))
    else:
        shown = [row | {"score": f"{row['score']:.6g}"} for row in rows]
        print_table(shown, list(dict.fromkeys(k for row in rows for k in row)) or list(RESULT_COLUMNS))
    return 0


def csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def export(client: Client, args: argparse.Namespace) -> int:
    output = Path(args.output or f"{args.attribution}.{args.format or 'parquet'}")
    path = client.export(args.attribution, output, format=args.format)
    if args.json:
        print_json({"attribution_id": args.attribution, "path": str(path), "bytes": path.stat().st_size})
    else:
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


def edit(client: Client, args: argparse.Namespace) -> int:
    remove = [int(value) if value.lstrip("-").isdigit() else value for value in args.remove]
    model = client.edit(args.attribution, remove, name=args.name, options=args.options, progress=not args.json)
    raw = dict(model.raw)
    if args.weights_out:
        raw["weights_path"] = str(client.download_weights(model, args.weights_out))
    show(raw, args, (*MODEL_FIELDS, "weights_path") if args.weights_out else MODEL_FIELDS)
    return 0


# ------------------------------------------------------------------------------------------ parser


def verb(commands: Any, name: str, help: str, handler: Handler) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name, help=help, description=help, epilog=EXIT_CODES, formatter_class=HelpFormatter
    )
    parser.add_argument("--url", default=None, help=f"API base URL (default: $ATTRIB_URL, else {DEFAULT_URL})")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts instead of human text")
    parser.set_defaults(func=lambda args: run(handler, args))
    return parser


def add_client_verbs(commands: Any) -> None:
    """Add the client verbs to the `attrib` sub-command parser."""
    models = commands.add_parser("models", help="upload models").add_subparsers(dest="models_command", required=True)
    upload = verb(
        models, "upload", "upload a model: a safetensors file and its declarative architecture", models_upload
    )
    upload.add_argument("weights", type=Path, help="safetensors file of the model's state_dict")
    upload.add_argument("--name", required=True, help="a name for the model")
    upload.add_argument(
        "--architecture",
        type=json_argument,
        required=True,
        help='JSON (inline or a file): {"type": "sequential", "layers": [...]} or the layer list',
    )
    upload.add_argument(
        "--loss",
        default="cross_entropy",
        choices=["cross_entropy", "mse", "causal_lm"],
        help="what the model is trained for",
    )
    upload.add_argument("--format", default="spec", choices=["spec"], help="model format")

    datasets = commands.add_parser("datasets", help="upload datasets").add_subparsers(
        dest="datasets_command", required=True
    )
    upload = verb(
        datasets, "upload", "upload a dataset: safetensors, .npz or Parquet with inputs, targets, ids", datasets_upload
    )
    upload.add_argument("file", type=Path, help="the dataset file")
    upload.add_argument("--name", required=True, help="a name for the dataset")

    run_ = verb(commands, "attribute", "submit an attribution and follow its job with a progress bar", attribute)
    run_.add_argument(
        "--model",
        required=True,
        action="append",
        help="model id (repeat for an ensemble of models of one architecture)",
    )
    run_.add_argument("--train", required=True, help="training dataset id")
    run_.add_argument("--queries", default=None, help="query dataset id (not used with --mode self)")
    run_.add_argument(
        "--method",
        default="influence",
        choices=[
            "influence",
            "source",
            "datainf",
            "tracin",
            "gradient_similarity",
            "meta_task_influence",
            "meta_instance_influence",
        ],
        help="attribution method",
    )
    run_.add_argument("--mode", default="pairwise", choices=["pairwise", "aggregate", "self"], help="what to rank")
    run_.add_argument("--measurement", default="loss", choices=["loss", "margin"], help="what is attributed")
    run_.add_argument("--top-k", type=int, default=10, help="rows per query and direction")
    run_.add_argument("--fit", default=None, help="id of a stored curvature fit to reuse")
    run_.add_argument(
        "--options",
        type=json_argument,
        default=None,
        help='method options as JSON (inline or a file), e.g. \'{"strategy": "ekfac"}\'',
    )
    run_.add_argument("--no-wait", action="store_true", help="return once the job is queued")

    jobs = commands.add_parser("jobs", help="show or cancel jobs").add_subparsers(dest="jobs_command", required=True)
    for name, help_text, handler in (
        ("show", "show a job's status and progress", jobs_show),
        ("cancel", "cancel a queued or running job", jobs_cancel),
    ):
        parser = verb(jobs, name, help_text, handler)
        parser.add_argument("job", help="job id")

    rows = verb(commands, "results", "print an attribution's ranked rows", results)
    rows.add_argument("attribution", help="attribution id")
    rows.add_argument("--query", default=None, help="only this query id (default: every query)")
    rows.add_argument(
        "--direction",
        default="both",
        choices=["both", "positive", "negative"],
        help="helpful (positive), harmful (negative) or both",
    )
    rows.add_argument("--limit", type=int, default=None, help="at most this many rows per query and direction")
    rows.add_argument("--format", default="table", choices=["table", "csv", "json"], help="output format")

    out = verb(commands, "export", "save every result row to a file", export)
    out.add_argument("attribution", help="attribution id")
    out.add_argument("--output", "-o", default=None, help="file to write (default: ATTRIBUTION.FORMAT)")
    out.add_argument(
        "--format",
        default=None,
        choices=["csv", "parquet", "ndjson"],
        help="file format (default: from the output's suffix, else parquet)",
    )

    change = verb(commands, "edit", "make a model that estimates retraining without some training examples", edit)
    change.add_argument("attribution", help="attribution id")
    change.add_argument("--remove", required=True, nargs="+", help="training ids (or task ids) to remove")
    change.add_argument("--name", required=True, help="name of the new model")
    change.add_argument("--weights-out", default=None, help="also download the new weights to this file")
    change.add_argument(
        "--options",
        type=json_argument,
        default=None,
        help='edit options as JSON (inline or a file), e.g. \'{"estimator": "proximal", "max_steps": 10}\'',
    )


def run(handler: Handler, args: argparse.Namespace) -> None:
    """Run a verb and exit with its status; API errors become a message on stderr and an exit code."""
    try:
        with Client(args.url) as client:
            code = handler(client, args)
    except ConfigurationError as exc:
        code = fail(EXIT_AUTH, str(exc))
    except JobFailed as exc:
        code = fail(EXIT_JOB_FAILED, str(exc))
    except ApiError as exc:
        code = fail(exit_code_of(exc), describe(exc))
    except (ConnectionFailed, httpx.HTTPError) as exc:
        code = fail(EXIT_UNAVAILABLE, f"cannot reach the server: {exc}")
    except (OSError, ValueError) as exc:  # a file that cannot be read, an export format that does not exist
        code = fail(EXIT_REFUSED, str(exc))
    raise SystemExit(code)


def exit_code_of(error: ApiError) -> int:
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, Unauthorized):
        return EXIT_AUTH
    if isinstance(error, (ServiceUnavailable, ServerError)):
        return EXIT_UNAVAILABLE
    return EXIT_REFUSED


def describe(error: ApiError) -> str:
    lines = [f"{error.status} {error.title}: {error.detail}"]
    lines += [f"  {field_error.field}: {field_error.message}" for field_error in error.errors]
    return "\n".join(lines)


def fail(code: int, message: str) -> int:
    print(f"attrib: {message}", file=sys.stderr)
    return code
