"""Every API call the SDK makes, built once and sent by either client (sync or async)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from attrib.options import Edit, MethodOptions, edit_options_json, method_and_options
from attrib.payloads import FilePart, dataset_part, file_part, weights_part
from attrib.transport import Call

EXPORT_FORMATS = ("csv", "parquet", "ndjson")


def ident(resource: Any) -> str:
    """The id of a resource record, or the string given."""
    return str(getattr(resource, "id", resource))


def multipart(path: str, metadata: dict[str, Any], files: list[FilePart]) -> Call:
    return Call("POST", path, form={"metadata": json.dumps(metadata)}, files=files)


def upload_model(
    weights: Any,
    *,
    name: str,
    format: str,
    architecture: Any,
    loss: str | None,
    task: dict[str, Any] | None,
    config: Any,
    weights_index: Any,
    tokenizer: Any,
    tokenizer_config: Any,
    archive: Any,
    base_model: Any,
    adapter_config: Any,
) -> Call:
    metadata: dict[str, Any] = {"name": name, "format": format}
    if architecture is not None:
        metadata["architecture"] = (
            {"type": "sequential", "layers": list(architecture)} if isinstance(architecture, list) else architecture
        )
    if task is not None or loss is not None:
        metadata["task"] = dict(task or {}) | ({"loss": loss} if loss else {})
    if base_model is not None:
        metadata["base_model_id"] = ident(base_model)
    files: list[FilePart] = []
    if archive is not None:
        files.append(file_part("archive", archive, "model.tar.gz"))
    shards = weights if isinstance(weights, (list, tuple)) else ([weights] if weights is not None else [])
    files += [weights_part(shard) for shard in shards]
    named = {
        "config": (config, "config.json"),
        "weights_index": (weights_index, "model.safetensors.index.json"),
        "tokenizer": (tokenizer, "tokenizer.json"),
        "tokenizer_config": (tokenizer_config, "tokenizer_config.json"),
        "adapter_config": (adapter_config, "adapter_config.json"),
    }
    for field, (value, filename) in named.items():
        if value is not None:
            data = json.dumps(value).encode() if isinstance(value, dict) else value
            files.append(file_part(field, data, filename))
    return multipart("/v1/models", metadata, files)


def upload_checkpoint(
    model: Any, weights: Any, *, step: int, learning_rate: float, stage: int, momentum: float
) -> Call:
    metadata = {"step": step, "learning_rate": learning_rate, "stage": stage, "momentum": momentum}
    return multipart(f"/v1/models/{ident(model)}/checkpoints", metadata, [weights_part(weights)])


def upload_dataset(data: Any, *, name: str, extra_metadata: dict[str, Any] | None, **arrays: Any) -> Call:
    return multipart("/v1/datasets", {"name": name, **(extra_metadata or {})}, [dataset_part(data, **arrays)])


def attribute(
    model: Any,
    train: Any,
    queries: Any,
    *,
    method: str | None,
    mode: str,
    measurement: str,
    top_k: int,
    fit: Any,
    options: MethodOptions | dict[str, Any] | None,
    extra: dict[str, Any] | None,
) -> Call:
    method_name, options_json = method_and_options(method, options)
    body: dict[str, Any] = {
        "train_dataset_id": ident(train),
        "method": method_name,
        "mode": mode,
        "measurement": measurement,
        "top_k": top_k,
        "options": options_json,
    }
    if isinstance(model, (list, tuple)):
        body["model_ids"] = [ident(m) for m in model]
    else:
        body["model_id"] = ident(model)
    if queries is not None:
        body["query_dataset_id"] = ident(queries)
    if fit is not None:
        body["fit_id"] = ident(fit)
    return Call("POST", "/v1/attributions", json=body | (extra or {}))


def fit(model: Any, dataset: Any, *, strategy: str, damping: float | None, options: dict[str, Any]) -> Call:
    body = {"model_id": ident(model), "dataset_id": ident(dataset), "strategy": strategy, "damping": damping, **options}
    return Call("POST", "/v1/fits", json=body)


def results_page(
    attribution: Any,
    *,
    query_id: Any,
    direction: str,
    page_size: int,
    page_token: str | None,
    query_token: int | None = None,
) -> Call:
    params = {
        "query_id": None if query_id is None else str(query_id),
        "query_token": query_token,
        "direction": direction,
        "page_size": page_size,
        "page_token": page_token,
    }
    return Call("GET", f"/v1/attributions/{ident(attribution)}/results", params=params)


def export_format(path: Path | None, format: str | None) -> str:
    """The export format: given, else from the file's suffix, else Parquet."""
    if format is None and path is not None:
        format = path.suffix.lstrip(".").lower() or None
    format = format or "parquet"
    if format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, not {format!r}")
    return format


def export(attribution: Any, format: str) -> Call:
    return Call("GET", f"/v1/attributions/{ident(attribution)}/results/export", params={"format": format})


def edit(attribution: Any, remove: list[Any], name: str, options: Edit | dict[str, Any] | None = None) -> Call:
    ids = [item.item() if hasattr(item, "item") else item for item in remove]  # numpy / torch scalars → int, str
    body: dict[str, Any] = {"remove": ids, "name": name}
    chosen = edit_options_json(options)
    if chosen:
        body["options"] = chosen
    return Call("POST", f"/v1/attributions/{ident(attribution)}/edit", json=body)


def examples(dataset: Any, ids: list[Any]) -> Call:
    return Call("GET", f"/v1/datasets/{ident(dataset)}/examples", params={"ids": [str(i) for i in ids]})
