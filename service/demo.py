"""`attrib demo`: train a small MLP on scikit-learn's digits, upload it over HTTP to an embedded server,
run an attribution job, and print the most helpful and most harmful training examples for a few queries."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from typing import Any

import httpx
import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from sklearn.datasets import load_digits
from torch import nn

from service.embedded import read_api_key
from service.settings import Settings

ARCHITECTURE = {
    "type": "sequential",
    "layers": [
        {"type": "linear", "in_features": 64, "out_features": 64},
        {"type": "relu"},
        {"type": "linear", "in_features": 64, "out_features": 10},
    ],
}
NUM_QUERIES = 3
TOP_K = 5


def train_digits_mlp(seed: int = 0) -> tuple[nn.Sequential, dict[str, np.ndarray]]:
    """About a second on a laptop CPU: full-batch Adam on 1,500 digits, 300 held out."""
    digits = load_digits()
    inputs = (digits.data / 16.0).astype(np.float32)
    targets = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(inputs))
    train, test = order[:1500], order[1500:]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    x, y = torch.from_numpy(inputs[train]), torch.from_numpy(targets[train])
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(inputs[test])).argmax(dim=1).numpy()
    positions = pick_queries(targets[test], predicted)
    queries = test[positions]
    data = {
        "train_x": inputs[train],
        "train_y": targets[train],
        "train_ids": train.astype(np.int64),
        "test_x": inputs[queries],
        "test_y": targets[queries],
        "test_ids": queries.astype(np.int64),
        "test_predicted": predicted[positions],
    }
    return model, data


def pick_queries(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Positions of a misclassified test digit (when there is one), then of correctly classified ones."""
    wrong = np.flatnonzero(labels != predicted)[:1]
    right = np.flatnonzero(labels == predicted)
    return np.concatenate([wrong, right])[:NUM_QUERIES]


def npz_bytes(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def wait_until_up(client: httpx.Client, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"attrib demo: the server exited with code {server.returncode}")
        try:
            if client.get("/healthz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("attrib demo: the server did not start in time")


def check(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise SystemExit(
            f"attrib demo: {response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text}"
        )
    return response.json()


def progress_line(job: dict[str, Any]) -> str:
    progress = job["progress"]
    total = max(progress["total"], 1)
    filled = int(30 * min(progress["completed"], total) / total)
    return (
        f"  {job['status']:<9} {progress['stage']:<10} [{'#' * filled}{'.' * (30 - filled)}] "
        f"{progress['completed']}/{progress['total']}"
    )


def wait_for_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    shown = ""
    while True:
        job = check(client.get(f"/v1/jobs/{job_id}"))
        line = progress_line(job)
        if line != shown:
            ending = "" if sys.stderr.isatty() else "\n"
            print(("\r" if sys.stderr.isatty() else "") + line + "   ", end=ending, file=sys.stderr, flush=True)
            shown = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            if sys.stderr.isatty():
                print(file=sys.stderr)
            return job
        time.sleep(0.3)


def run_demo(port: int = 8765, keep: bool = False, method: str = "influence") -> None:
    settings = Settings()
    base_url = f"http://127.0.0.1:{port}"
    print("attrib demo: starting the embedded server (SQLite, local files, one local worker)...", file=sys.stderr)
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=os.environ.copy()
    )
    try:
        with httpx.Client(base_url=base_url, timeout=60.0) as client:
            wait_until_up(client, server)
            client.headers["Authorization"] = f"Bearer {read_api_key(settings)}"
            attribution_id = demo_session(client, method)
        print(closing_words(settings, base_url, attribution_id, keep), file=sys.stderr)
        if keep:
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(timeout=30)


def closing_words(settings: Settings, base_url: str, attribution_id: str, keep: bool) -> str:
    """Where to look next: the results page and the API docs, and how to keep a server running for them."""
    page = f"/ui/attributions/{attribution_id}"
    key = f"the page asks for the API key once: it is in {settings.api_key_file.resolve()}"
    if keep:
        return (
            f"\nResults page: {base_url}{page} ({key})\nAPI docs: {base_url}/docs\n"
            f"attrib demo: the server keeps running on {base_url} (Ctrl-C to stop)"
        )
    return (
        f"\nattrib demo: the server stops now. To look at these results in a browser, run `attrib demo --keep` "
        f"(the server stays up) and open the results page it prints, or run `attrib serve` and open "
        f"http://127.0.0.1:8000{page} ({key}).\nAPI docs: /docs on the running server."
    )


def demo_session(client: httpx.Client, method: str) -> str:
    """Train, upload, attribute and print; returns the attribution's id."""
    print("attrib demo: training a 64-64-10 MLP on scikit-learn's digits...", file=sys.stderr)
    model, data = train_digits_mlp()
    weights = save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()})
    metadata = {"name": "digits-mlp", "format": "spec", "architecture": ARCHITECTURE, "task": {"loss": "cross_entropy"}}
    uploaded = check(
        client.post(
            "/v1/models", data={"metadata": json.dumps(metadata)}, files={"weights": ("model.safetensors", weights)}
        )
    )
    train = check(
        client.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": "digits-train"})},
            files={
                "data": ("train.npz", npz_bytes(inputs=data["train_x"], targets=data["train_y"], ids=data["train_ids"]))
            },
        )
    )
    queries = check(
        client.post(
            "/v1/datasets",
            data={"metadata": json.dumps({"name": "digits-queries"})},
            files={
                "data": ("queries.npz", npz_bytes(inputs=data["test_x"], targets=data["test_y"], ids=data["test_ids"]))
            },
        )
    )
    print(
        f"  model {uploaded['id']} ({uploaded['num_parameters']} parameters, tracked layers "
        f"{uploaded['tracked_layers']}); {train['num_examples']} training examples",
        file=sys.stderr,
    )
    request = {
        "model_id": uploaded["id"],
        "train_dataset_id": train["id"],
        "query_dataset_id": queries["id"],
        "method": method,
        "mode": "pairwise",
        "measurement": "margin",
        "top_k": TOP_K,
    }
    attribution = check(client.post("/v1/attributions", json=request))
    print(
        f"attrib demo: attribution {attribution['id']} ({method}) queued as job {attribution['job_id']}",
        file=sys.stderr,
    )
    job = wait_for_job(client, attribution["job_id"])
    if job["status"] != "succeeded":
        raise SystemExit(f"attrib demo: the job {job['status']}: {job['error']}")
    print_results(client, attribution["id"], data)
    return str(attribution["id"])


def print_results(client: httpx.Client, attribution_id: str, data: dict[str, np.ndarray]) -> None:
    label_of = dict(zip(data["train_ids"].tolist(), data["train_y"].tolist(), strict=True))
    print(
        "\nScores: influence on the query's margin (positive = the training example helps the model get the "
        "query right)."
    )
    for query_id, label, predicted in zip(
        data["test_ids"].tolist(), data["test_y"].tolist(), data["test_predicted"].tolist(), strict=True
    ):
        verdict = "correct" if label == predicted else "WRONG"
        print(f"\nTest digit {query_id}: a handwritten {label}, the model says {predicted} ({verdict})")
        for direction, title in (("positive", "most helpful"), ("negative", "most harmful")):
            page = check(
                client.get(
                    f"/v1/attributions/{attribution_id}/results",
                    params={"query_id": query_id, "direction": direction, "page_size": TOP_K},
                )
            )
            shown = ", ".join(
                f"#{row['train_id']} (label {label_of[row['train_id']]}, score {row['score']:+.3g})"
                for row in page["results"]
            )
            print(f"  {title:>13}: {shown}")
