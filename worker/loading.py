"""Loading stored artifacts (model weights, checkpoints, datasets, fits) for a job. Nothing is unpickled."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sqlalchemy.orm import Session
from tokenizers import Tokenizer
from torch import nn

from service.db.tables import Blob, Checkpoint, Dataset, Model
from service.storage import BlobStore, StoredBlob
from worker.artifacts.datasets import DatasetArrays, read_dataset, to_examples
from worker.artifacts.formats import StoredModel, model_format
from worker.artifacts.text_datasets import STORED_FORMAT as TEXT_FORMAT
from worker.artifacts.text_datasets import TextArrays, read_stored
from worker.artifacts.tokenizer import load_tokenizer
from worker.artifacts.weights import save_weights
from worker.attribution import Curvature, Examples, load_curvature
from worker.attribution.curvature.base import KEY_SEPARATOR
from worker.attribution.text import TextBatch


def load_model(store: BlobStore, model: Model, weights_sha256: str | None = None) -> nn.Module:
    """The model's module with its own weights, or those of one of its checkpoints, built by its format
    (worker.artifacts.formats): strictly, from safetensors, no pickle, no remote code."""
    with ExitStack() as stack:
        stored = stored_model(stack, store, model, weights_sha256 or model.weights_sha256)
        return model_format(model.format).build(stored)


def stored_model(stack: ExitStack, store: BlobStore, model: Model, weights_sha256: str) -> StoredModel:
    """The model's stored pieces as local files (weights, and kept files such as a tokenizer), open for as long as
    ``stack`` is."""
    files = model.architecture.get("files") or {}
    return StoredModel(
        architecture=model.architecture,
        task=model.task,
        weights=stack.enter_context(store.local_path(weights_sha256)),
        files={name: stack.enter_context(store.local_path(sha256)) for name, sha256 in files.items()},
    )


def load_model_tokenizer(store: BlobStore, model: Model) -> Tokenizer | None:
    """The tokenizer.json uploaded with the model (read by the `tokenizers` library: data only), or None."""
    sha256 = (model.architecture.get("files") or {}).get("tokenizer")
    if not isinstance(sha256, str):
        return None
    with store.local_path(sha256) as path:
        return load_tokenizer(path)


def load_checkpoint(store: BlobStore, model: Model, checkpoint: Checkpoint) -> nn.Module:
    return load_model(store, model, checkpoint.weights_sha256)


def load_dataset(store: BlobStore, dataset: Dataset) -> DatasetArrays:
    with store.local_path(dataset.blob_sha256) as path:
        return read_dataset(path, dataset.format, max_rows=max(dataset.num_examples, 1))


def load_text_dataset(store: BlobStore, dataset: Dataset) -> TextArrays:
    """A text dataset (format ``text``) as validated and stored at upload: token ids, mask, labels or targets."""
    with store.local_path(dataset.blob_sha256) as path:
        return read_stored(path)


def load_examples(store: BlobStore, dataset: Dataset) -> tuple[Examples, DatasetArrays]:
    if dataset.format == TEXT_FORMAT:
        return load_text_examples(store, dataset)
    arrays = load_dataset(store, dataset)
    return to_examples(arrays), arrays


def load_text_examples(store: BlobStore, dataset: Dataset) -> tuple[Examples, DatasetArrays]:
    """A text dataset in the engine's token form (worker.attribution.text): token ids as inputs, the attention
    mask, and labels (causal LM: -100 = not scored) or class targets; the arrays carry the example ids."""
    text = load_text_dataset(store, dataset)
    input_ids, mask = torch.from_numpy(text.input_ids), torch.from_numpy(text.attention_mask)
    if text.labels is not None:
        examples = TextBatch(input_ids=input_ids, attention_mask=mask, labels=torch.from_numpy(text.labels)).examples()
        targets = text.labels
    else:
        assert text.targets is not None
        examples = Examples(inputs=input_ids, targets=torch.from_numpy(text.targets), attention_mask=mask)
        targets = text.targets
    return examples, DatasetArrays(inputs=text.input_ids, targets=targets, ids=text.ids)


def put_written(session: Session, store: BlobStore, write: Callable[[Path], object]) -> StoredBlob:
    """Store the file that ``write`` creates at the path it is given (written once, in the store's staging area)."""
    stored = store.stage_written(write).commit()
    if session.get(Blob, stored.sha256) is None:
        session.add(Blob(sha256=stored.sha256, size=stored.size))
        session.flush()
    return stored


def put_state_dict(session: Session, store: BlobStore, state: dict[str, torch.Tensor]) -> StoredBlob:
    return put_written(session, store, lambda path: save_weights(state, path))


def put_curvatures(session: Session, store: BlobStore, curvatures: dict[str, Curvature]) -> StoredBlob:
    """One safetensors file holding several named curvatures (one per model or checkpoint)."""
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict[str, str]] = {}
    for name, curvature in curvatures.items():
        for key, tensor in curvature.to_tensors().items():
            tensors[f"{name}{KEY_SEPARATOR}{key}"] = tensor.detach().cpu().contiguous()
        entries[name] = curvature.metadata()
    metadata = {"entries": json.dumps(entries)}
    return put_written(session, store, lambda path: save_file(tensors, str(path), metadata=metadata))


def load_curvatures(store: BlobStore, sha256: str) -> dict[str, Curvature]:
    from safetensors import safe_open

    with store.local_path(sha256) as path:
        with safe_open(str(path), framework="pt") as handle:
            entries = json.loads((handle.metadata() or {})["entries"])
        tensors = load_file(str(path))
    curvatures = {}
    for name, metadata in entries.items():
        prefix = f"{name}{KEY_SEPARATOR}"
        own = {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}
        curvatures[name] = load_curvature(own, metadata)
    return curvatures
