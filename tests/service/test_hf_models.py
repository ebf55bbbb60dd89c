"""Hugging Face uploads (`format: "hf"`): parts and archives, shards, the loader, hostile uploads, text datasets.

Every model is a tiny config with random weights, `save_pretrained` to a temporary folder; the tokenizer is a
WordLevel `tokenizers` tokenizer made in the test. Nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_safetensors
from sqlalchemy import func, select
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    ViTConfig,
)

from service.db.session import session_scope
from service.db.tables import Blob, Dataset, Model
from service.storage.local import LocalBlobStore
from tests.service.conftest import Api, build_api
from worker.artifacts.text_datasets import IGNORE_INDEX
from worker.loading import load_model, load_text_dataset

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "and", "then", "it", "slept"]
VOCAB = {"[PAD]": 0, "[UNK]": 1, **{word: i + 2 for i, word in enumerate(WORDS)}}


def tiny_gpt2() -> PreTrainedModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return AutoModelForCausalLM.from_config(config)


def tiny_llama() -> PreTrainedModel:
    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(config)


def tiny_bert() -> PreTrainedModel:
    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    config.num_labels = 3
    return AutoModelForSequenceClassification.from_config(config)


MODELS = {
    "gpt2": (tiny_gpt2, {"loss": "causal_lm"}),
    "llama": (tiny_llama, {"loss": "causal_lm"}),
    "bert": (tiny_bert, {"loss": "cross_entropy", "head": "sequence_classification"}),
}


def tokenizer_json() -> str:
    tokenizer = Tokenizer(WordLevel(VOCAB, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer.to_str()


def saved(model: PreTrainedModel, folder: Path, **kwargs: Any) -> Path:
    model.save_pretrained(folder, **kwargs)
    (folder / "tokenizer.json").write_text(tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    return folder


def metadata(task: dict[str, Any], name: str = "hf") -> str:
    return json.dumps({"name": name, "format": "hf", "task": task})


def post_parts(api: Api, folder: Path, task: dict[str, Any], **extra: Any) -> Any:
    files: list[tuple[str, tuple[str, bytes]]] = [("config", ("config.json", (folder / "config.json").read_bytes()))]
    for path in sorted(folder.glob("*.safetensors")):
        files.append(("weights", (path.name, path.read_bytes())))
    for name, part in (
        ("model.safetensors.index.json", "weights_index"),
        ("tokenizer.json", "tokenizer"),
        ("tokenizer_config.json", "tokenizer_config"),
    ):
        if (folder / name).exists():
            files.append((part, (name, (folder / name).read_bytes())))
    return api.client.post("/v1/models", data={"metadata": metadata(task)}, files=files, **extra)


def pack(folder: Path, kind: str) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for path in sorted(folder.iterdir()):
                archive.write(path, f"model/{path.name}")
        return "model.zip", buffer.getvalue()
    with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tar.gz" else "w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return f"model.{kind}", buffer.getvalue()


def post_archive(api: Api, name: str, content: bytes, task: dict[str, Any]) -> Any:
    return api.client.post("/v1/models", data={"metadata": metadata(task)}, files={"archive": (name, content)})


def counts(api: Api) -> tuple[int, int, int]:
    with session_scope(api.settings.resolved_database_url) as session:
        blobs = session.scalar(select(func.count()).select_from(Blob))
        models = session.scalar(select(func.count()).select_from(Model))
    staged = len(list((api.settings.resolved_storage_dir / "staging").iterdir()))
    return int(blobs or 0), int(models or 0), staged


def linear_names(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def loaded(api: Api, model_id: str) -> torch.nn.Module:
    with session_scope(api.settings.resolved_database_url) as session:
        row = session.get(Model, model_id)
        assert row is not None
        return load_model(LocalBlobStore(api.settings.resolved_storage_dir), row)


@pytest.fixture
def small_api(tmp_path: Path) -> Iterator[Api]:
    yield from build_api(tmp_path, None, max_upload_bytes=2 * 1024 * 1024)


# --------------------------------------------------------------------------------------------- good uploads


@pytest.mark.parametrize(
    ("name", "how"), [("gpt2", "parts"), ("llama", "tar.gz"), ("bert", "zip"), ("gpt2", "tar"), ("bert", "parts")]
)
def test_uploads_load_back_as_the_same_model(sqlite_api: Api, tmp_path: Path, name: str, how: str) -> None:
    make, task = MODELS[name]
    model = make().eval()
    folder = saved(model, tmp_path / "model")
    response = (
        post_parts(sqlite_api, folder, task) if how == "parts" else post_archive(sqlite_api, *pack(folder, how), task)
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["format"] == "hf"
    assert body["num_parameters"] == sum(p.numel() for p in model.parameters())
    expected_layers = [n for n in linear_names(model) if n != "lm_head"]  # the LM head is not tracked by default
    assert body["tracked_layers"] == expected_layers
    assert body["architecture"]["config"]["model_type"] == name
    rebuilt = loaded(sqlite_api, body["id"])
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.allclose(rebuilt(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    weights = load_safetensors(sqlite_api.client.get(f"/v1/models/{body['id']}/weights").content)
    for key, tensor in load_file(str(folder / "model.safetensors")).items():
        assert torch.equal(weights[key], tensor), key


def test_an_image_classifier(sqlite_api: Api, tmp_path: Path) -> None:
    torch.manual_seed(3)
    config = ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    config.num_labels = 3
    model = AutoModelForImageClassification.from_config(config).eval()
    model.save_pretrained(tmp_path / "vit")
    response = post_parts(sqlite_api, tmp_path / "vit", {"loss": "cross_entropy", "head": "image_classification"})
    assert response.status_code == 201, response.text
    assert response.json()["tracked_layers"] == linear_names(model)
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(
            loaded(sqlite_api, response.json()["id"])(pixel_values=pixels).logits,
            model(pixel_values=pixels).logits,
            atol=1e-6,
        )


def test_sharded_weights_with_their_index(sqlite_api: Api, tmp_path: Path) -> None:
    model = tiny_gpt2().eval()
    folder = saved(model, tmp_path / "model", max_shard_size="20KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists()
    response = post_parts(sqlite_api, folder, {"loss": "causal_lm"})
    assert response.status_code == 201, response.text
    weights = load_safetensors(sqlite_api.client.get(f"/v1/models/{response.json()['id']}/weights").content)
    originals = {k: v for shard in shards for k, v in load_file(str(shard)).items()}
    assert set(weights) == set(originals)
    assert all(torch.equal(weights[k], v) for k, v in originals.items())
    (folder / "model.safetensors.index.json").unlink()
    missing_index = post_parts(sqlite_api, folder, {"loss": "causal_lm"})
    assert missing_index.status_code == 422 and "weights_index" in missing_index.json()["detail"]


def test_formats_route_lists_the_allow_list(sqlite_api: Api) -> None:
    body = sqlite_api.client.get("/v1/models/formats").json()
    by_name = {f["name"]: f for f in body["formats"]}
    assert set(by_name) == {"spec", "hf", "lora"} and body["not_supported_yet"] == ["onnx"]
    assert {"gpt2", "llama", "qwen2", "bert", "roberta", "distilbert", "vit"} <= set(by_name["hf"]["model_types"])


def test_hf_checkpoints_are_checked_against_the_config(sqlite_api: Api, tmp_path: Path) -> None:
    model = tiny_gpt2()
    model_id = post_parts(sqlite_api, saved(model, tmp_path / "m"), {"loss": "causal_lm"}).json()["id"]
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    meta = json.dumps({"step": 1, "learning_rate": 0.1})
    good = sqlite_api.client.post(
        f"/v1/models/{model_id}/checkpoints",
        data={"metadata": meta},
        files={"weights": ("w.safetensors", save_safetensors(state))},
    )
    assert good.status_code == 201, good.text
    state["transformer.wte.weight"] = torch.zeros(3, 16)
    bad = sqlite_api.client.post(
        f"/v1/models/{model_id}/checkpoints",
        data={"metadata": json.dumps({"step": 2, "learning_rate": 0.1})},
        files={"weights": ("w.safetensors", save_safetensors(state))},
    )
    assert bad.status_code == 422 and "transformer.wte.weight" in bad.json()["detail"]


# ------------------------------------------------------------------------------------------ hostile uploads


def edit_config(folder: Path, **changes: Any) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, change: str) -> None:
    path = folder / "model.safetensors"
    state = load_file(str(path))
    if change == "missing":
        del state["transformer.h.1.mlp.c_fc.weight"]
    elif change == "unexpected":
        state["transformer.h.9.extra.weight"] = torch.zeros(2)
    elif change == "shape":
        state["transformer.h.0.attn.c_proj.weight"] = torch.zeros(16, 15)
    elif change == "nan":
        state["transformer.ln_f.weight"][0] = float("nan")
    save_file(state, str(path))


def hostile_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def link_info(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


HOSTILE = [
    "auto_map",
    "unknown_model_type",
    "remote_code_type",
    "bin_weights",
    "pickle_in_archive",
    "symlink",
    "hardlink",
    "absolute_path",
    "dotdot",
    "missing_tensor",
    "unexpected_tensor",
    "misshaped_tensor",
    "nan_tensor",
    "too_many_parameters",
    "archive_bomb",
    "too_many_members",
    "deep_config",
    "bad_tokenizer",
    "tokenizer_auto_map",
    "architecture_given",
    "no_head",
    "vit_as_causal_lm",
    "zip_symlink",
    "too_many_layers",
    "indivisible_heads",
]
NAMED = {
    "missing_tensor": "transformer.h.1.mlp.c_fc.weight",
    "unexpected_tensor": "transformer.h.9.extra.weight",
    "misshaped_tensor": "transformer.h.0.attn.c_proj.weight",
    "nan_tensor": "transformer.ln_f.weight",
    "auto_map": "auto_map",
    "unknown_model_type": "model_type",
    "remote_code_type": "remote_code",
    "bin_weights": "pickle",
    "pickle_in_archive": "pickle",
    "too_many_parameters": "parameters",
    "zip_symlink": "link",
    "symlink": "link",
    "hardlink": "link",
    "dotdot": "..",
    "absolute_path": "absolute",
    "archive_bomb": "decompresses",
    "too_many_members": "members",
    "too_many_layers": "layers",
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_uploads_are_refused_and_leave_nothing(tmp_path: Path, case: str) -> None:
    limits: dict[str, int] = {"max_upload_bytes": 2 * 1024 * 1024}
    if case == "too_many_parameters":
        limits["max_parameters"] = 5_000
    for api in build_api(tmp_path, None, **limits):
        folder = saved(tiny_gpt2(), tmp_path / "model")
        task: dict[str, Any] = {"loss": "causal_lm"}
        before = counts(api)
        response = _hostile(api, folder, task, case)
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        if case in NAMED:
            assert NAMED[case] in response.json()["detail"], response.json()["detail"]
        assert counts(api) == before


def _hostile(api: Api, folder: Path, task: dict[str, Any], case: str) -> Any:
    config = (folder / "config.json").read_bytes()
    weights = (folder / "model.safetensors").read_bytes()
    if case == "auto_map":
        edit_config(folder, auto_map={"AutoModelForCausalLM": "evil.EvilModel"})
    elif case == "unknown_model_type":
        edit_config(folder, model_type="evil")
    elif case == "remote_code_type":
        edit_config(folder, model_type="custom_code", trust_remote_code=True)
    elif case in ("missing_tensor", "unexpected_tensor", "misshaped_tensor", "nan_tensor"):
        edit_weights(folder, case.removesuffix("_tensor").replace("misshaped", "shape"))
    elif case == "deep_config":
        (folder / "config.json").write_text(
            json.dumps({**json.loads(config), "nested": json.loads("[" * 40 + "]" * 40)})
        )
    elif case == "bad_tokenizer":
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    elif case == "tokenizer_auto_map":
        (folder / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    elif case == "architecture_given":
        return api.client.post(
            "/v1/models",
            data={
                "metadata": json.dumps(
                    {"name": "x", "format": "hf", "architecture": {"type": "sequential"}, "task": task}
                )
            },
            files={"config": ("config.json", config), "weights": ("model.safetensors", weights)},
        )
    elif case == "no_head":
        task = {"loss": "cross_entropy"}
    elif case == "vit_as_causal_lm":
        edit_config(folder, model_type="vit")
    elif case == "too_many_layers":
        edit_config(folder, n_layer=10**6)
    elif case == "indivisible_heads":
        edit_config(folder, n_head=3)
    elif case == "zip_symlink":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("config.json", config)
            archive.writestr("model.safetensors", weights)
            link = zipfile.ZipInfo("tokenizer.json")
            link.external_attr = 0o120777 << 16
            archive.writestr(link, "/etc/passwd")
        return post_archive(api, "model.zip", buffer.getvalue(), task)
    elif case == "bin_weights":
        return api.client.post(
            "/v1/models",
            data={"metadata": metadata(task)},
            files={"config": ("config.json", config), "weights": ("pytorch_model.bin", b"\x80\x02}q\x00.")},
        )
    elif case == "pickle_in_archive":
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
        return post_archive(api, *pack(folder, "tar.gz"), task)
    elif case in ("symlink", "hardlink", "absolute_path", "dotdot"):
        members: list[tuple[tarfile.TarInfo, bytes | None]] = [
            (file_info("config.json", len(config)), config),
            (file_info("model.safetensors", len(weights)), weights),
        ]
        if case == "symlink":
            members.append((link_info("tokenizer.json", "/etc/passwd", tarfile.SYMTYPE), None))
        elif case == "hardlink":
            members.append((link_info("tokenizer.json", "/etc/passwd", tarfile.LNKTYPE), None))
        elif case == "absolute_path":
            members.append((file_info("/tmp/evil.json", 2), b"{}"))
        else:
            members.append((file_info("../evil.json", 2), b"{}"))
        return post_archive(api, "model.tar.gz", hostile_tar(members), task)
    elif case == "archive_bomb":
        zeros = b"\x00" * (8 * 1024 * 1024)  # gzip makes this ~8 KiB; it unpacks past the 2 MiB limit
        members = [(file_info("config.json", len(config)), config), (file_info("padding.bin.txt", len(zeros)), zeros)]
        return post_archive(api, "model.tar.gz", hostile_tar(members), task)
    elif case == "too_many_members":
        members = [(file_info(f"f{i}.txt", 1), b"x") for i in range(300)]
        return post_archive(api, "model.tar.gz", hostile_tar(members), task)
    return post_parts(api, folder, task)


# ------------------------------------------------------------------------------------------- text datasets


def post_dataset(api: Api, content: bytes, filename: str, **meta: Any) -> Any:
    return api.client.post(
        "/v1/datasets", data={"metadata": json.dumps({"name": "text", **meta})}, files={"data": (filename, content)}
    )


def parquet_bytes(columns: dict[str, list[Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def stored_text(api: Api, dataset_id: str) -> Any:
    with session_scope(api.settings.resolved_database_url) as session:
        row = session.get(Dataset, dataset_id)
        assert row is not None and row.format == "text"
        return load_text_dataset(LocalBlobStore(api.settings.resolved_storage_dir), row)


def test_token_id_datasets_in_safetensors(sqlite_api: Api) -> None:
    input_ids = torch.tensor([[2, 3, 4, 5], [6, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    response = post_dataset(sqlite_api, save_safetensors({"input_ids": input_ids, "attention_mask": mask}), "t.st")
    assert response.status_code == 201, response.text
    fields = response.json()["fields"]
    assert fields["input_ids"]["shape"] == [2, 4] and fields["input_ids"]["max"] == 8
    stored = stored_text(sqlite_api, response.json()["id"])
    assert stored.labels.tolist() == [[2, 3, 4, 5], [6, 7, 8, IGNORE_INDEX]]
    bad = post_dataset(sqlite_api, save_safetensors({"input_ids": input_ids, "labels": torch.full((2, 4), -5)}), "b")
    assert bad.status_code == 422 and "labels" in bad.json()["detail"]


def test_text_and_prompt_completion_parquet_tokenized_with_the_models_tokenizer(
    sqlite_api: Api,
    tmp_path: Path,
) -> None:
    model_id = post_parts(sqlite_api, saved(tiny_gpt2(), tmp_path / "m"), {"loss": "causal_lm"}).json()["id"]
    text = parquet_bytes({"text": ["the cat sat on the mat", "a dog ran"], "ids": ["x", "y"]})
    assert post_dataset(sqlite_api, text, "t.parquet").status_code == 422  # no tokenize_with
    response = post_dataset(sqlite_api, text, "t.parquet", tokenize_with=model_id)
    assert response.status_code == 201, response.text
    stored = stored_text(sqlite_api, response.json()["id"])
    assert stored.input_ids[0].tolist() == [VOCAB[w] for w in ["the", "cat", "sat", "on", "the", "mat"]]
    assert stored.input_ids[1].tolist() == [VOCAB["a"], VOCAB["dog"], VOCAB["ran"], 0, 0, 0]
    assert stored.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0] and stored.ids.tolist() == ["x", "y"]

    pairs = parquet_bytes({"prompt": ["the cat", "a dog"], "completion": ["sat on the mat", "ran"]})
    response = post_dataset(sqlite_api, pairs, "p.parquet", tokenize_with=model_id, max_length=5, padding="max_length")
    assert response.status_code == 201, response.text
    stored = stored_text(sqlite_api, response.json()["id"])
    assert stored.labels.tolist() == [
        [IGNORE_INDEX, IGNORE_INDEX, VOCAB["sat"], VOCAB["on"], VOCAB["the"]],
        [IGNORE_INDEX, IGNORE_INDEX, VOCAB["ran"], IGNORE_INDEX, IGNORE_INDEX],
    ]
    strict = post_dataset(sqlite_api, pairs, "p.parquet", tokenize_with=model_id, max_length=5, truncation=False)
    assert strict.status_code == 422 and "max_length" in strict.json()["detail"]


# ------------------------------------------------------------------------------------------ at submission


def test_submission_checks_text_datasets_against_the_model(sqlite_api: Api, tmp_path: Path) -> None:
    api = sqlite_api
    gpt2 = post_parts(api, saved(tiny_gpt2(), tmp_path / "m"), {"loss": "causal_lm"}).json()["id"]
    bert = post_parts(api, saved(tiny_bert(), tmp_path / "b"), MODELS["bert"][1]).json()["id"]
    in_vocab = post_dataset(api, save_safetensors({"input_ids": torch.tensor([[2, 3, 4], [5, 6, 7]])}), "a").json()
    too_big = post_dataset(api, save_safetensors({"input_ids": torch.tensor([[2, 3, 99], [5, 6, 7]])}), "b").json()
    too_long = post_dataset(api, save_safetensors({"input_ids": torch.ones((2, 40), dtype=torch.int64)}), "c").json()
    numbers = api.upload_npz(inputs=torch.zeros(4, 4).numpy(), targets=torch.zeros(4, dtype=torch.int64).numpy())
    spec = api.upload_model(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)))

    def submit(model_id: str, train_id: str) -> Any:
        return api.client.post(
            "/v1/attributions",
            json={
                "model_id": model_id,
                "train_dataset_id": train_id,
                "query_dataset_id": in_vocab["id"],
                "method": "gradient_similarity",
                "mode": "pairwise",
                "top_k": 2,
            },
        )

    cases = [
        (gpt2, too_big["id"], "vocabulary size 16"),
        (gpt2, too_long["id"], "at most 32"),
        (gpt2, numbers.json()["id"], "text dataset"),
        (bert, in_vocab["id"], "targets"),
        (spec.json()["id"], in_vocab["id"], 'format "hf"'),
    ]
    for model_id, train_id, words in cases:
        response = submit(model_id, train_id)
        assert response.status_code == 422, response.text
        assert words in response.json()["detail"], response.json()["detail"]


# ------------------------------------------------------------------------------------------------ end to end


def summed_nll_gradients(model: PreTrainedModel, input_ids: Any, mask: Any, labels: Any, layers: list[str]) -> Any:
    """Per example: the gradient of the summed next-token NLL over the tracked layers' weights and biases."""
    modules = dict(model.named_modules())
    params = [p for name in layers for p in (modules[name].weight, modules[name].bias) if p is not None]
    rows = []
    for i in range(input_ids.shape[0]):
        logits = model(input_ids=input_ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0, :-1]
        target = labels[i, 1:]
        loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_gpt2_text_attribution_end_to_end(sqlite_api: Api, tmp_path: Path) -> None:
    api = sqlite_api
    model = tiny_gpt2().eval()
    uploaded = post_parts(api, saved(model, tmp_path / "m"), {"loss": "causal_lm"}).json()
    train = post_dataset(
        api,
        parquet_bytes(
            {
                "text": ["the cat sat on the mat", "a dog ran in the park", "the cat slept", "a dog sat"],
                "ids": ["t0", "t1", "t2", "t3"],
            }
        ),
        "train.parquet",
        tokenize_with=uploaded["id"],
    ).json()
    query = post_dataset(
        api,
        parquet_bytes({"prompt": ["the cat", "a dog"], "completion": ["sat", "ran"]}),
        "query.parquet",
        tokenize_with=uploaded["id"],
    ).json()
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": uploaded["id"],
            "train_dataset_id": train["id"],
            "query_dataset_id": query["id"],
            "method": "gradient_similarity",
            "mode": "pairwise",
            "top_k": 4,
        },
    )
    assert response.status_code == 202, response.text
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    rows = api.client.get(
        f"/v1/attributions/{response.json()['id']}/results", params={"direction": "positive", "page_size": 100}
    ).json()["results"]
    scores = {(r["query_id"], r["train_id"]): r["score"] for r in rows}
    assert {train_id for _, train_id in scores} <= {"t0", "t1", "t2", "t3"} and {q for q, _ in scores} == {0, 1}

    def tensors(dataset_id: str) -> tuple[Any, Any, Any]:
        stored = stored_text(api, dataset_id)
        return (
            torch.from_numpy(stored.input_ids),
            torch.from_numpy(stored.attention_mask),
            torch.from_numpy(stored.labels),
        )

    layers = uploaded["tracked_layers"]
    exact = (
        summed_nll_gradients(model, *tensors(query["id"]), layers)
        @ summed_nll_gradients(model, *tensors(train["id"]), layers).T
    )
    for (query_id, train_id), score in scores.items():
        assert score == pytest.approx(float(exact[query_id, int(train_id[1])]), rel=1e-3, abs=1e-5)

    influence = api.client.post(
        "/v1/attributions",
        json={
            "model_id": uploaded["id"],
            "train_dataset_id": train["id"],
            "query_dataset_id": query["id"],
            "method": "influence",
            "mode": "pairwise",
            "top_k": 2,
        },
    )
    assert influence.status_code == 202, influence.text
    job = api.client.get(f"/v1/jobs/{influence.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]


def test_bert_sequence_classification_end_to_end(sqlite_api: Api, tmp_path: Path) -> None:
    api = sqlite_api
    uploaded = post_parts(api, saved(tiny_bert(), tmp_path / "b"), MODELS["bert"][1]).json()
    data = save_safetensors(
        {
            "input_ids": torch.tensor([[2, 3, 4, 0], [5, 6, 7, 8], [9, 10, 0, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]),
            "targets": torch.tensor([0, 2, 1]),
        }
    )
    dataset = post_dataset(api, data, "cls.safetensors").json()
    assert dataset["fields"]["targets"]["shape"] == [3]
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": uploaded["id"],
            "train_dataset_id": dataset["id"],
            "mode": "self",
            "method": "influence",
            "top_k": 3,
        },
    )
    assert response.status_code == 202, response.text
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    out_of_range = post_dataset(
        api, save_safetensors({"input_ids": torch.tensor([[2, 3]]), "targets": torch.tensor([5])}), "bad.safetensors"
    ).json()
    refused = api.client.post(
        "/v1/attributions",
        json={
            "model_id": uploaded["id"],
            "train_dataset_id": out_of_range["id"],
            "mode": "self",
            "method": "influence",
        },
    )
    assert refused.status_code == 422 and "targets" in refused.json()["detail"], refused.text
