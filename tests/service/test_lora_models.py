"""LoRA adapters (`format: "lora"`) on a stored `hf` model, through the API: upload as parts and as archives,
attribution on the adapter (EK-FAC influence, DataInf, and TracInCP and SOURCE with adapter checkpoints) against
the engine run directly on the same peft model, edits of LoRA and plain Hugging Face attributions, hostile
adapter uploads, and a base that adapters use refused deletion (409).

The bases are the tiny GPT-2 and Llama of test_hf_models, the adapters peft LoraConfigs made here and
`save_pretrained` to a temporary folder. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select

from service.db.base import utcnow
from service.db.session import session_scope
from service.db.tables import Dataset, Model
from service.routers import models as models_router
from service.storage.local import LocalBlobStore
from tests.service.conftest import Api, build_api, tiny_classifier
from tests.service.test_hf_models import (
    counts,
    loaded,
    pack,
    parquet_bytes,
    post_dataset,
    post_parts,
    saved,
    tiny_gpt2,
    tiny_llama,
)
from worker.attribution import AttributionScores, Examples, attribute
from worker.attribution.methods.source import attribute_source
from worker.attribution.methods.tracin import attribute_tracin
from worker.attribution.trajectory import TrajectoryCheckpoint
from worker.loading import load_examples
from worker.methods.datainf import DataInfOptions
from worker.methods.engine_options import datainf_options, influence_options, source_options
from worker.methods.influence import InfluenceOptions
from worker.methods.source import SourceOptions

TASK = {"loss": "causal_lm"}
TRAIN = {
    "text": [
        "the cat sat on the mat",
        "a dog ran in the park",
        "the cat slept",
        "a dog sat",
        "then it ran and slept",
        "the dog sat on a mat",
    ],
    "ids": ["t0", "t1", "t2", "t3", "t4", "t5"],
}
QUERIES = {"prompt": ["the cat", "a dog"], "completion": ["sat", "ran"]}
SCORE_TOLERANCE = {"rel": 1e-4, "abs": 1e-6}  # float32 engine, same weights and data: rounding only


def lora_config(**changes: Any) -> peft.LoraConfig:
    options: dict[str, Any] = {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["c_attn", "c_fc"],
        "fan_in_fan_out": True,
        "init_lora_weights": False,  # random A and B: the adapter changes the model
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
        **changes,
    }
    return peft.LoraConfig(**options)


def adapted(base: torch.nn.Module, seed: int = 3, **changes: Any) -> peft.PeftModel:
    """``base`` wrapped (in place: peft replaces its target modules) with a random adapter."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, lora_config(**changes))
    assert isinstance(model, peft.PeftModel)
    return model.eval()


def adapter_parts(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [
        ("adapter_config", ("adapter_config.json", (folder / "adapter_config.json").read_bytes())),
        ("weights", ("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())),
    ]


def lora_metadata(base_id: str, name: str = "lora", **extra: Any) -> str:
    return json.dumps({"name": name, "format": "lora", "base_model_id": base_id, "task": TASK, **extra})


def post_lora(api: Api, base_id: str, files: list[tuple[str, tuple[str, bytes]]], **extra: Any) -> Any:
    return api.client.post("/v1/models", data={"metadata": lora_metadata(base_id, **extra)}, files=files)


def run(api: Api, body: dict[str, Any]) -> dict[str, Any]:
    response = api.client.post("/v1/attributions", json=body)
    assert response.status_code == 202, response.text
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    return dict(api.client.get(f"/v1/attributions/{response.json()['id']}").json())


def all_scores(api: Api, attribution_id: str) -> dict[tuple[int, str], float]:
    rows = api.client.get(
        f"/v1/attributions/{attribution_id}/results", params={"direction": "positive", "page_size": 500}
    ).json()["results"]
    return {(r["query_id"], r["train_id"]): r["score"] for r in rows}


def examples(api: Api, dataset_id: str) -> Examples:
    with session_scope(api.settings.resolved_database_url) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None
        return load_examples(LocalBlobStore(api.settings.resolved_storage_dir), row)[0]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


@pytest.fixture
def uploaded(sqlite_api: Api, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A tiny GPT-2 base (format hf, with its tokenizer), its LoRA adapter (format lora), text datasets tokenized
    with the adapter model's tokenizer (the base's)."""
    api = sqlite_api
    base = tiny_gpt2().eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_response = post_parts(api, saved(base, tmp_path / "base"), TASK)
    assert base_response.status_code == 201, base_response.text
    model = adapted(base)
    model.save_pretrained(tmp_path / "adapter")
    response = post_lora(api, base_response.json()["id"], adapter_parts(tmp_path / "adapter"))
    assert response.status_code == 201, response.text
    lora = response.json()
    train = post_dataset(api, parquet_bytes(TRAIN), "train.parquet", tokenize_with=lora["id"]).json()
    query = post_dataset(api, parquet_bytes(QUERIES), "query.parquet", tokenize_with=lora["id"]).json()
    yield {
        "api": api,
        "model": model,
        "base": base_response.json(),
        "base_state": base_state,
        "lora": lora,
        "train": train["id"],
        "query": query["id"],
        "folder": tmp_path / "adapter",
    }


def body(setup: dict[str, Any], method: str, **extra: Any) -> dict[str, Any]:
    return {
        "model_id": setup["lora"]["id"],
        "train_dataset_id": setup["train"],
        "query_dataset_id": setup["query"],
        "method": method,
        "mode": "pairwise",
        "top_k": len(TRAIN["ids"]),
        **extra,
    }


# ------------------------------------------------------------------------------------------- the model


def test_lora_uploads_load_back_as_the_adapted_model(uploaded: dict[str, Any], tmp_path: Path) -> None:
    api, model, lora = uploaded["api"], uploaded["model"], uploaded["lora"]
    assert lora["format"] == "lora" and lora["base_model_id"] == uploaded["base"]["id"]
    assert api.client.get(f"/v1/models/{lora['id']}").json()["base_model_id"] == uploaded["base"]["id"]
    assert api.client.get(f"/v1/models/{uploaded['base']['id']}").json()["base_model_id"] is None
    assert lora["tracked_layers"] == [
        f"base_model.model.transformer.h.{i}.{module}.{matrix}.default"
        for i in range(2)
        for module in ("attn.c_attn", "mlp.c_fc")
        for matrix in ("lora_A", "lora_B")
    ]
    assert lora["num_parameters"] == sum(p.numel() for p in model.parameters())
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    expected = model(input_ids=ids).logits
    archived = post_lora(api, uploaded["base"]["id"], [("archive", pack(uploaded["folder"], "tar.gz"))])
    assert archived.status_code == 201, archived.text
    for model_id in (lora["id"], archived.json()["id"]):
        built = loaded(api, model_id)
        assert isinstance(built, peft.PeftModel) and not built.training
        torch.testing.assert_close(built(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)
    formats = {f["name"]: f for f in api.client.get("/v1/models/formats").json()["formats"]}
    assert formats["lora"]["parts"] == ["adapter_config", "weights", "archive"]
    # a Llama base (Linear projections, not Conv1D), the adapter as a zip archive
    llama = tiny_llama().eval()
    llama_base = post_parts(api, saved(llama, tmp_path / "llama"), TASK).json()
    llama_adapted = adapted(llama, target_modules=["q_proj", "v_proj"], fan_in_fan_out=False)
    llama_adapted.save_pretrained(tmp_path / "llama-adapter")
    response = post_lora(api, llama_base["id"], [("archive", pack(tmp_path / "llama-adapter", "zip"))])
    assert response.status_code == 201, response.text
    assert len(response.json()["tracked_layers"]) == 8 and response.json()["base_model_id"] == llama_base["id"]
    torch.testing.assert_close(
        loaded(api, response.json()["id"])(input_ids=ids).logits,
        llama_adapted(input_ids=ids).logits,
        rtol=1e-5,
        atol=1e-6,
    )


# ------------------------------------------------------------------------------------------- attribution


def test_ekfac_influence_and_datainf_on_the_adapter_equal_the_engine(uploaded: dict[str, Any]) -> None:
    api, model = uploaded["api"], uploaded["model"]
    train, queries = examples(api, uploaded["train"]), examples(api, uploaded["query"])
    influence = run(api, body(uploaded, "influence", options={"strategy": "ekfac"}))
    expected = attribute(
        [model],
        train,
        queries,
        loss="causal_lm",
        method="influence",
        mode="pairwise",
        top_k=len(train),
        options=influence_options(InfluenceOptions(strategy="ekfac")),
    )
    assert_scores(all_scores(api, influence["id"]), expected)
    datainf = run(api, body(uploaded, "datainf"))
    expected = attribute(
        [model],
        train,
        queries,
        loss="causal_lm",
        method="datainf",
        mode="pairwise",
        top_k=len(train),
        options=datainf_options(DataInfOptions()),
    )
    assert_scores(all_scores(api, datainf["id"]), expected)


def assert_scores(scores: dict[tuple[int, str], float], expected: AttributionScores) -> None:
    """Every (query, train) score of the API equals the engine's (all pairs: top_k = the training count)."""
    assert expected.topk is not None
    assert len(scores) == expected.topk.positive_indices.numel()
    for q in range(expected.topk.positive_indices.shape[0]):
        indices, values = expected.topk.positive_indices[q].tolist(), expected.topk.positive_scores[q].tolist()
        for index, score in zip(indices, values, strict=True):
            assert scores[(q, TRAIN["ids"][index])] == pytest.approx(score, **SCORE_TOLERANCE), (q, index)


def test_tracin_and_source_on_two_adapter_checkpoints(uploaded: dict[str, Any]) -> None:
    api, model, lora_id = uploaded["api"], uploaded["model"], uploaded["lora"]["id"]
    trajectory = []
    for step in (1, 2):
        checkpoint = copy.deepcopy(model)
        with torch.no_grad():
            for name, parameter in checkpoint.named_parameters():
                if "lora_" in name:
                    parameter.mul_(1.0 - 0.2 * step)
        adapter = {k: v.contiguous() for k, v in peft.get_peft_model_state_dict(checkpoint).items()}
        response = api.client.post(
            f"/v1/models/{lora_id}/checkpoints",
            data={"metadata": json.dumps({"step": step, "learning_rate": 0.1})},
            files={"weights": ("adapter_model.safetensors", save_safetensors(adapter))},
        )
        assert response.status_code == 201, response.text
        trajectory.append(TrajectoryCheckpoint(checkpoint.eval(), step, 0.1))
    # a checkpoint of a LoRA model is adapter weights: the base model's weights are refused, naming the tensors
    base_state = {k: v.contiguous() for k, v in uploaded["base_state"].items() if k != "lm_head.weight"}
    refused = api.client.post(
        f"/v1/models/{lora_id}/checkpoints",
        data={"metadata": json.dumps({"step": 3, "learning_rate": 0.1})},
        files={"weights": ("w.safetensors", save_safetensors(base_state))},
    )
    assert refused.status_code == 422 and "missing tensors" in refused.json()["detail"], refused.text
    train, queries = examples(api, uploaded["train"]), examples(api, uploaded["query"])
    tracin = run(api, body(uploaded, "tracin"))
    expected = attribute_tracin(trajectory, train, queries, loss="causal_lm", mode="pairwise", top_k=len(train))
    assert_scores(all_scores(api, tracin["id"]), expected)
    source = run(api, body(uploaded, "source", options={"segments": 2}))
    expected = attribute_source(
        model,
        trajectory,
        {0: train},
        train,
        queries,
        loss="causal_lm",
        mode="pairwise",
        top_k=len(train),
        options=source_options(SourceOptions(segments=2)),
    )
    assert_scores(all_scores(api, source["id"]), expected)


# ------------------------------------------------------------------------------------------- edits


def test_edit_of_a_lora_attribution_is_a_new_adapter_on_the_same_base(uploaded: dict[str, Any]) -> None:
    api, model = uploaded["api"], uploaded["model"]
    attribution = run(api, body(uploaded, "influence", options={"strategy": "ekfac"}))
    edited = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": ["t0", "t3"], "name": "e"})
    assert edited.status_code == 202, edited.text
    job = api.client.get(f"/v1/jobs/{edited.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    new = api.client.get(f"/v1/models/{edited.json()['model_id']}").json()
    assert (new["format"], new["base_model_id"]) == ("lora", uploaded["base"]["id"])
    assert new["tracked_layers"] == uploaded["lora"]["tracked_layers"]
    assert new["edit_diagnostics"]["num_removed"] == 2 and new["edit_diagnostics"]["relative_step_norm"] > 0
    weights = load_safetensors(api.client.get(f"/v1/models/{new['id']}/weights").content)
    original = load_file(str(uploaded["folder"] / "adapter_model.safetensors"))
    assert set(weights) == set(original)  # adapter tensors only, under peft's file names
    assert any(not torch.equal(weights[k], original[k]) for k in original)
    rebuilt = loaded(api, new["id"])
    base_before = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    base_after = {k: v for k, v in rebuilt.state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)


def test_an_edit_whose_base_is_deleted_while_it_waits_fails_and_stores_no_adapter(uploaded: dict[str, Any]) -> None:
    """An edit of a LoRA attribution is queued; meanwhile its adapter and then the base are deleted (allowed: no
    live adapter is left on the base). The edit job fails with a problem naming the base, and no adapter on the
    deleted base appears."""
    api, base = uploaded["api"], uploaded["base"]
    attribution = run(api, body(uploaded, "influence", options={"strategy": "kfac"}))
    api.queue.paused = True
    edited = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": ["t0"], "name": "late"})
    assert edited.status_code == 202, edited.text
    assert api.client.delete(f"/v1/models/{uploaded['lora']['id']}").status_code == 204
    assert api.client.delete(f"/v1/models/{base['id']}").status_code == 204
    api.queue.paused = False
    api.queue.enqueue(edited.json()["job_id"], "edit")
    job = api.client.get(f"/v1/jobs/{edited.json()['job_id']}").json()
    assert job["status"] == "failed", job
    assert job["error"]["status"] == 422 and base["id"] in job["error"]["detail"], job["error"]
    assert api.client.get(f"/v1/models/{edited.json()['model_id']}").status_code == 404
    with session_scope(api.settings.resolved_database_url) as session:
        assert session.get(Model, edited.json()["model_id"]) is None


def test_edit_of_an_hf_attribution_is_a_new_hf_model(uploaded: dict[str, Any]) -> None:
    api, base = uploaded["api"], uploaded["base"]
    attribution = run(api, {**body(uploaded, "influence", options={"strategy": "kfac"}), "model_id": base["id"]})
    edited = api.client.post(f"/v1/attributions/{attribution['id']}/edit", json={"remove": ["t1"], "name": "e"})
    assert edited.status_code == 202, edited.text
    job = api.client.get(f"/v1/jobs/{edited.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    new = api.client.get(f"/v1/models/{edited.json()['model_id']}").json()
    assert new["format"] == "hf" and new["base_model_id"] is None
    weights = load_safetensors(api.client.get(f"/v1/models/{new['id']}/weights").content)
    before = uploaded["base_state"]
    assert "lm_head.weight" not in weights  # tied to the token embedding, stored once as save_pretrained does
    tracked = {f"{layer}.{kind}" for layer in base["tracked_layers"] for kind in ("weight", "bias")}
    changed = {k for k, v in weights.items() if not torch.equal(v, before[k])}
    assert changed and changed <= tracked
    rebuilt = loaded(api, new["id"])
    assert rebuilt.lm_head.weight.data_ptr() == rebuilt.transformer.wte.weight.data_ptr()


# ------------------------------------------------------------------------------------------- hostile uploads


def edited_config(folder: Path, **changes: Any) -> bytes:
    raw = json.loads((folder / "adapter_config.json").read_text())
    return json.dumps({**raw, **changes}).encode()


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def hostile_cases(setup: dict[str, Any], other_base: str, spec_model: str) -> dict[str, tuple[Any, str]]:
    """case -> (the request's metadata base id and files, words the problem detail must hold)."""
    folder, base = setup["folder"], setup["base"]["id"]
    config = (folder / "adapter_config.json").read_bytes()
    tensors = adapter_tensors(folder)
    first = sorted(tensors)[0]

    def files(config_bytes: bytes = config, weights: dict[str, torch.Tensor] | None = None) -> list[Any]:
        content = save_safetensors(tensors if weights is None else weights)
        return [
            ("adapter_config", ("adapter_config.json", config_bytes)),
            ("weights", ("adapter_model.safetensors", content)),
        ]

    link = tarfile.TarInfo("adapter_model.safetensors")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("adapter_config.json")
        info.size = len(config)
        tar.addfile(info, io.BytesIO(config))
        tar.addfile(link)
    shape = list(tensors[first].shape)
    return {
        "unknown_base": (("mdl_missing", files()), "mdl_missing"),
        "other_tenants_base": ((other_base, files()), other_base),
        "base_not_hf": ((spec_model, files()), 'format "hf" base'),
        "no_base": ((None, files()), "base_model_id"),
        "pickle_weights": (
            (base, [files()[0], ("weights", ("adapter_model.bin", b"\x80\x02}q\x00."))]),
            "pickle",
        ),
        "symlink_archive": ((base, [("archive", ("a.tar.gz", buffer.getvalue()))]), "link"),
        "archive_without_config": (
            (base, [("archive", ("a.zip", pack_only(folder, "adapter_model.safetensors")))]),
            "adapter_config.json",
        ),
        "not_lora": ((base, files(edited_config(folder, peft_type="IA3"))), "LORA"),
        "absent_target": ((base, files(edited_config(folder, target_modules=["c_attn", "q_proj"]))), "q_proj"),
        "regex_target": ((base, files(edited_config(folder, target_modules=".*c_attn"))), "regular expression"),
        "huge_rank": ((base, files(edited_config(folder, r=100_000))), "rank"),
        "auto_mapping": (
            (base, files(edited_config(folder, auto_mapping={"base_model_class": "Evil", "parent_library": "evil"}))),
            "auto_mapping",
        ),
        "dora": ((base, files(edited_config(folder, use_dora=True))), "DoRA"),
        "unknown_key": ((base, files(edited_config(folder, evil_hook="x"))), "evil_hook"),
        "missing_tensor": ((base, files(weights={k: v for k, v in tensors.items() if k != first})), first),
        "unexpected_tensor": ((base, files(weights={**tensors, "extra.weight": torch.zeros(2)})), "extra.weight"),
        "misshaped_tensor": (
            (base, files(weights={**tensors, first: torch.zeros(shape[0] + 1, shape[1])})),
            f"{first!r} has shape",
        ),
        "nan_values": ((base, files(weights={**tensors, first: torch.full(shape, float("nan"))})), "NaN"),
    }


def pack_only(folder: Path, name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.write(folder / name, f"adapter/{name}")
    return buffer.getvalue()


def test_hostile_adapter_uploads_are_refused_and_leave_nothing(uploaded: dict[str, Any], tmp_path: Path) -> None:
    api = uploaded["api"]
    foreign = post_parts(api, saved(tiny_gpt2(), tmp_path / "foreign"), TASK, headers=api.new_key("tenant-other"))
    assert foreign.status_code == 201, foreign.text
    spec_model = api.upload_model(tiny_classifier()).json()["id"]
    cases = hostile_cases(uploaded, foreign.json()["id"], spec_model)
    for case, ((base_id, files), words) in cases.items():
        before = counts(api)
        meta: dict[str, Any] = {"name": case, "format": "lora", "task": TASK}
        if base_id is not None:
            meta["base_model_id"] = base_id
        response = api.client.post("/v1/models", data={"metadata": json.dumps(meta)}, files=files)
        assert 400 <= response.status_code < 500, (case, response.text)
        assert response.headers["content-type"].startswith("application/problem+json"), case
        assert words in response.json()["detail"], (case, response.json()["detail"])
        assert counts(api) == before, case


# ------------------------------------------------------------------------------------------- deleting the base


def test_a_base_with_live_adapters_is_not_deleted(api: Api, tmp_path: Path) -> None:
    """SQLite and PostgreSQL: DELETE of a base that live adapters use is a 409 naming them, and the base and its
    adapters stay usable; once the adapters are deleted, the base is (204), and a new adapter on it is a 404."""
    base = post_parts(api, saved(tiny_gpt2().eval(), tmp_path / "base"), TASK).json()
    other = post_parts(api, saved(tiny_gpt2().eval(), tmp_path / "other"), TASK).json()
    adapted(tiny_gpt2()).save_pretrained(tmp_path / "adapter")
    first = post_lora(api, base["id"], adapter_parts(tmp_path / "adapter"), name="first").json()
    second = post_lora(api, base["id"], adapter_parts(tmp_path / "adapter"), name="second").json()
    on_other = post_lora(api, other["id"], adapter_parts(tmp_path / "adapter"), name="on-other").json()

    refused = api.client.delete(f"/v1/models/{base['id']}")
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["type"].endswith("/conflict") and problem["status"] == 409
    assert first["id"] in problem["detail"] and second["id"] in problem["detail"]
    assert on_other["id"] not in problem["detail"] and "delete them first" in problem["detail"]
    for model_id in (base["id"], first["id"], second["id"]):
        assert api.client.get(f"/v1/models/{model_id}").status_code == 200, model_id

    assert api.client.delete(f"/v1/models/{first['id']}").status_code == 204  # an adapter itself: deleted
    still = api.client.delete(f"/v1/models/{base['id']}")
    assert still.status_code == 409 and second["id"] in still.json()["detail"]
    assert first["id"] not in still.json()["detail"]
    assert api.client.delete(f"/v1/models/{second['id']}").status_code == 204
    assert api.client.delete(f"/v1/models/{base['id']}").status_code == 204
    assert api.client.get(f"/v1/models/{base['id']}").status_code == 404
    orphan = post_lora(api, base["id"], adapter_parts(tmp_path / "adapter"))
    assert orphan.status_code == 404 and base["id"] in orphan.json()["detail"]
    # the other base keeps its adapter, and deleting it is refused the same way
    assert api.client.delete(f"/v1/models/{other['id']}").status_code == 409


@pytest.fixture
def postgres_api(tmp_path: Path, postgres_schema_url: str) -> Iterator[Api]:
    yield from build_api(tmp_path, postgres_schema_url)


def test_a_base_deleted_during_an_adapter_upload_refuses_the_adapter(
    postgres_api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL (SQLite has one writer at a time): the base deleted, and committed by another session, after
    the upload checked it and before the adapter row is inserted: the upload re-reads the base under a row lock
    and answers 404 instead of storing an adapter on a deleted base."""
    api = postgres_api
    base = post_parts(api, saved(tiny_gpt2().eval(), tmp_path / "base"), TASK).json()
    adapted(tiny_gpt2()).save_pretrained(tmp_path / "adapter")
    prepare = models_router.prepare_and_store

    def prepare_then_delete_the_base(*args: Any, **kwargs: Any) -> Any:
        stored = prepare(*args, **kwargs)
        with session_scope(api.settings.resolved_database_url) as session:
            row = session.get(Model, base["id"])
            assert row is not None
            row.deleted_at = utcnow()
        return stored

    monkeypatch.setattr(models_router, "prepare_and_store", prepare_then_delete_the_base)
    before = counts(api)
    response = post_lora(api, base["id"], adapter_parts(tmp_path / "adapter"))
    assert response.status_code == 404 and base["id"] in response.json()["detail"], response.text
    on_base = Model.architecture["base_model_id"].as_string() == base["id"]
    with session_scope(api.settings.resolved_database_url) as session:
        assert session.scalar(select(func.count()).select_from(Model).where(on_base)) == 0
    assert counts(api)[1] == before[1]  # no model row added
