"""The CLI verbs as subprocesses against a real `attrib serve`: the same path as the SDK, plus exit codes."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from tests.client.conftest import Served
from tests.service.conftest import MLP_ARCHITECTURE, tiny_classifier, tiny_dataset

pytestmark = pytest.mark.e2e


def attrib(served: Served, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=served.env(**env),
            capture_output=True,
            text=True,
            timeout=240,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"`attrib {' '.join(args)}` timed out; the server said:\n{served.log_tail()}") from exc


def attrib_json(served: Served, *args: str) -> Any:
    result = attrib(served, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("cli-files")
    save_file({k: v.contiguous() for k, v in tiny_classifier().state_dict().items()}, folder / "model.safetensors")
    (folder / "architecture.json").write_text(json.dumps(MLP_ARCHITECTURE))
    np.savez(folder / "train.npz", **tiny_dataset(30, seed=1, ids=np.arange(200, 230)))
    np.savez(folder / "queries.npz", **tiny_dataset(2, seed=2, ids=np.array([7, 8])))
    return {
        "folder": folder,
        "model": folder / "model.safetensors",
        "architecture": folder / "architecture.json",
        "train": folder / "train.npz",
        "queries": folder / "queries.npz",
    }


def test_upload_attribute_results_export_edit(served: Served, files: dict[str, Path]) -> None:
    model = attrib_json(
        served, "models", "upload", str(files["model"]), "--name", "tiny", "--architecture", str(files["architecture"])
    )
    assert model["tracked_layers"] == ["0", "2"]
    train = attrib_json(served, "datasets", "upload", str(files["train"]), "--name", "train")
    queries = attrib_json(served, "datasets", "upload", str(files["queries"]), "--name", "queries")
    assert (train["num_examples"], queries["num_examples"]) == (30, 2)

    attribution = attrib_json(
        served,
        "attribute",
        "--model",
        model["id"],
        "--train",
        train["id"],
        "--queries",
        queries["id"],
        "--top-k",
        "3",
        "--options",
        '{"strategy": "kfac"}',
    )
    assert attribution["status"] == "succeeded" and attribution["options"]["strategy"] == "kfac"
    job = attrib_json(served, "jobs", "show", attribution["job_id"])
    assert job["status"] == "succeeded" and job["attribution_id"] == attribution["id"]

    rows = attrib_json(served, "results", attribution["id"], "--query", "8")
    assert [(r["query_id"], r["direction"], r["rank"]) for r in rows] == (
        [(8, "positive", k) for k in (1, 2, 3)] + [(8, "negative", k) for k in (1, 2, 3)]
    )
    table = attrib(served, "results", attribution["id"], "--direction", "negative", "--limit", "2")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["QUERY_ID", "DIRECTION", "RANK", "TRAIN_ID", "SCORE"] and len(lines) == 1 + 2 * 2
    as_csv = attrib(served, "results", attribution["id"], "--format", "csv").stdout.splitlines()
    assert as_csv[0] == "query_id,direction,rank,train_id,score" and len(as_csv) == 1 + 2 * 2 * 3

    out = files["folder"] / "rows.csv"
    exported = attrib_json(served, "export", attribution["id"], "-o", str(out))
    assert exported["path"] == str(out)
    with out.open() as handle:
        assert len(list(csv.DictReader(handle))) == 2 * 2 * 3

    harmful = [str(r["train_id"]) for r in rows if r["direction"] == "negative"]
    weights = files["folder"] / "edited.safetensors"
    edited = attrib_json(
        served,
        "edit",
        attribution["id"],
        "--remove",
        *harmful,
        "--name",
        "tiny-edited",
        "--weights-out",
        str(weights),
        "--options",
        '{"estimator": "first_order"}',
    )
    assert edited["id"] != model["id"] and edited["weights_path"] == str(weights)
    assert edited["edit_diagnostics"]["estimator"] == "first_order"  # the options reached the edit
    assert set(load_file(weights)) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_no_wait_then_cancel_or_finished(served: Served, files: dict[str, Path]) -> None:
    model = attrib_json(
        served,
        "models",
        "upload",
        str(files["model"]),
        "--name",
        "m",
        "--architecture",
        json.dumps(MLP_ARCHITECTURE["layers"]),
    )
    train = attrib_json(served, "datasets", "upload", str(files["train"]), "--name", "t")
    queued = attrib_json(
        served, "attribute", "--model", model["id"], "--train", train["id"], "--mode", "self", "--no-wait"
    )
    assert queued["status"] in ("queued", "running", "succeeded")
    cancel = attrib(served, "jobs", "cancel", queued["job_id"], "--json")
    # a job cancelled in time answers 0; one that already finished is a 409, exit code 3
    assert cancel.returncode in (0, 3), cancel.stderr
    if cancel.returncode == 3:
        assert "already finished" in cancel.stderr


def test_exit_codes_scripts_can_test(served: Served, files: dict[str, Path]) -> None:
    missing = attrib(served, "jobs", "show", "job_missing")
    assert missing.returncode == 4 and "job_missing" in missing.stderr
    refused = attrib(
        served,
        "models",
        "upload",
        str(files["model"]),
        "--name",
        "bad",
        "--architecture",
        '{"type": "sequential", "layers": [{"type": "no-such-layer"}]}',
    )
    assert refused.returncode == 3 and "422" in refused.stderr
    bad_key = attrib(served, "jobs", "show", "job_missing", ATTRIB_API_KEY="atk_wrong")
    assert bad_key.returncode == 5
    no_key = attrib(served, "jobs", "show", "job_x", ATTRIB_DATA_DIR=str(files["folder"] / "nowhere"))
    assert no_key.returncode == 5 and "ATTRIB_API_KEY" in no_key.stderr
    unreachable = attrib(served, "jobs", "show", "job_x", ATTRIB_URL="http://127.0.0.1:9")
    assert unreachable.returncode == 6
    usage = attrib(served, "results")
    assert usage.returncode == 2
    help_text = attrib(served, "attribute", "--help").stdout
    assert "(default: influence)" in help_text and "(default: 10)" in help_text and "exit codes" in help_text
