"""Attribution jobs on Hugging Face models through the API, checked against autograd: a Llama causal LM (pairwise,
text tokenized with its uploaded tokenizer), a BERT sequence classifier (pairwise, margin) and a ViT image
classifier (images as a float `inputs` field of shape (N, channels, size, size)). Tiny configs, nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForImageClassification, PreTrainedModel, ViTConfig

from tests.service.conftest import Api
from tests.service.test_hf_models import (
    MODELS,
    linear_names,
    parquet_bytes,
    post_dataset,
    post_parts,
    saved,
    stored_text,
    summed_nll_gradients,
)

REL = 1e-3  # float32 models: the service's scores against autograd
ABS = 1e-5


def layer_params(model: torch.nn.Module, layers: list[str]) -> list[torch.nn.Parameter]:
    modules = dict(model.named_modules())
    return [p for name in layers for p in (modules[name].weight, modules[name].bias) if p is not None]


def flat_grad(value: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params)])


def similarity_job(api: Api, model_id: str, train_id: str, query_id: str, **extra: Any) -> dict[tuple[Any, Any], float]:
    """A gradient_similarity pairwise job with top_k = every training example: (query_id, train_id) -> score."""
    response = api.client.post(
        "/v1/attributions",
        json={
            "model_id": model_id,
            "train_dataset_id": train_id,
            "query_dataset_id": query_id,
            "method": "gradient_similarity",
            "mode": "pairwise",
            **extra,
        },
    )
    assert response.status_code == 202, response.text
    job = api.client.get(f"/v1/jobs/{response.json()['job_id']}").json()
    assert job["status"] == "succeeded", job["error"]
    rows = api.client.get(
        f"/v1/attributions/{response.json()['id']}/results", params={"direction": "positive", "page_size": 1000}
    ).json()["results"]
    return {(r["query_id"], r["train_id"]): r["score"] for r in rows}


def test_llama_text_attribution_end_to_end(sqlite_api: Api, tmp_path: Path) -> None:
    api = sqlite_api
    model = MODELS["llama"][0]().eval()
    uploaded = post_parts(api, saved(model, tmp_path / "llama"), {"loss": "causal_lm"}).json()
    train = post_dataset(
        api,
        parquet_bytes({"text": ["the cat sat on the mat", "a dog ran in the park", "the cat slept", "a dog sat"]}),
        "train.parquet",
        tokenize_with=uploaded["id"],
    ).json()
    query = post_dataset(
        api,
        parquet_bytes({"prompt": ["the cat", "a dog"], "completion": ["sat on the mat", "ran"]}),
        "query.parquet",
        tokenize_with=uploaded["id"],
    ).json()
    scores = similarity_job(api, uploaded["id"], train["id"], query["id"], top_k=4)
    assert len(scores) == 2 * 4

    def gradients(dataset_id: str) -> torch.Tensor:
        stored = stored_text(api, dataset_id)
        tensors = (stored.input_ids, stored.attention_mask, stored.labels)
        result: torch.Tensor = summed_nll_gradients(
            model, *(torch.from_numpy(t) for t in tensors), uploaded["tracked_layers"]
        )
        return result

    exact = gradients(query["id"]) @ gradients(train["id"]).T
    for (query_id, train_id), score in scores.items():
        assert score == pytest.approx(float(exact[query_id, train_id]), rel=REL, abs=ABS)


def test_bert_pairwise_margin_end_to_end(sqlite_api: Api, tmp_path: Path) -> None:
    api = sqlite_api
    model = MODELS["bert"][0]().eval()
    uploaded = post_parts(api, saved(model, tmp_path / "bert"), MODELS["bert"][1]).json()
    input_ids = torch.tensor([[2, 3, 4, 0], [5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    targets = torch.tensor([0, 2, 1])
    data = save_safetensors({"input_ids": input_ids, "attention_mask": mask, "targets": targets})
    dataset = post_dataset(api, data, "cls.safetensors").json()
    scores = similarity_job(api, uploaded["id"], dataset["id"], dataset["id"], top_k=3, measurement="margin")
    params = layer_params(model, uploaded["tracked_layers"])

    def logits(i: int) -> torch.Tensor:
        out: torch.Tensor = model(input_ids=input_ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]
        return out

    def margin(i: int) -> torch.Tensor:
        out = logits(i)
        others = torch.cat([out[: targets[i]], out[targets[i] + 1 :]])
        return out[targets[i]] - torch.logsumexp(others, dim=0)

    def loss(i: int) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits(i)[None], targets[i : i + 1])

    # f(z_q) = -margin (larger = worse, as a loss): score = <grad f(z_q), grad loss(z_i)>, positive = helps
    for (query_id, train_id), score in scores.items():
        exact = -flat_grad(margin(query_id), params) @ flat_grad(loss(train_id), params)
        assert score == pytest.approx(float(exact), rel=REL, abs=ABS)
    assert len(scores) == 9


def tiny_vit() -> PreTrainedModel:
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
    return AutoModelForImageClassification.from_config(config).eval()


def test_vit_image_classification_attribution_end_to_end(sqlite_api: Api, tmp_path: Path) -> None:
    api = sqlite_api
    model = tiny_vit()
    model.save_pretrained(tmp_path / "vit")
    task = {"loss": "cross_entropy", "head": "image_classification"}
    uploaded = post_parts(api, tmp_path / "vit", task).json()
    assert uploaded["tracked_layers"] == linear_names(model)
    rng = np.random.default_rng(4)
    images = rng.normal(size=(6, 3, 8, 8)).astype(np.float32)  # (N, channels, size, size), as the config says
    labels = rng.integers(0, 3, size=6)
    train = api.upload_npz(inputs=images[:4], targets=labels[:4]).json()
    query = api.upload_npz(inputs=images[4:], targets=labels[4:]).json()
    assert train["fields"]["inputs"]["shape"] == [4, 3, 8, 8]
    scores = similarity_job(api, uploaded["id"], train["id"], query["id"], top_k=4)
    params = layer_params(model, uploaded["tracked_layers"])

    def gradient(array: np.ndarray, target: int) -> torch.Tensor:
        logits = model(pixel_values=torch.from_numpy(array[None])).logits
        return flat_grad(torch.nn.functional.cross_entropy(logits, torch.tensor([target])), params)

    train_grads = [gradient(images[i], int(labels[i])) for i in range(4)]
    for (query_id, train_id), score in scores.items():
        exact = gradient(images[4 + query_id], int(labels[4 + query_id])) @ train_grads[train_id]
        assert score == pytest.approx(float(exact), rel=REL, abs=ABS)
    assert len(scores) == 2 * 4

    wrong_shape = api.upload_npz(inputs=images[:, :, :4, :4], targets=labels).json()
    refused = api.client.post(
        "/v1/attributions",
        json={"model_id": uploaded["id"], "train_dataset_id": wrong_shape["id"], "mode": "self", "top_k": 2},
    )
    assert refused.status_code == 422 and "[3, 8, 8]" in refused.json()["detail"], refused.text
