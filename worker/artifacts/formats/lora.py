"""``format: "lora"``: a peft LoRA adapter on top of a stored ``hf`` model (``metadata.base_model_id``).

The upload is the two files of peft's ``save_pretrained`` folder, ``adapter_config`` (adapter_config.json) and
``weights`` (adapter_model.safetensors), or one ``archive`` of that folder. What is checked before anything is
allocated:

- adapter_config.json is a bounded JSON object whose keys are ``LoraConfig`` fields: ``peft_type`` LORA;
  ``target_modules`` a list of module names that each name modules of the base (a regular-expression string is
  refused); rank and alpha bounded (``rank_pattern`` / ``alpha_pattern`` too, keyed by plain names);
  ``task_type`` fitting the base's head; an ``auto_mapping`` is accepted only when it names the base's own
  transformers class (it is never imported: the base model is built as format ``hf`` builds it); every other
  field must be left at its default (DoRA, bias training, initialisation from the base weights (PiSSA,
  LoftQ...), layer replication, trainable tokens and the like are refused);
- the adapter is built on the base model on the meta device: base and adapter parameters together are counted
  against the limit, and the adapter weights' names and shapes must be exactly the adapter's (a missing,
  unexpected or mis-shaped tensor is named); values must be finite; safetensors only (pickles are refused).

Stored: the adapter weights (peft's file names, float32) as the model's weights; the base model's config, head
and tokenizer config, the validated adapter config and the base model's id as the architecture; the base's
weights (and tokenizer) as linked files (``architecture["files"]``: ``base_weights``, ``tokenizer``). The worker
builds the base model as format ``hf`` does and wraps it with the adapter (``peft.get_peft_model``); its
checkpoints and edits are adapter weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from worker.artifacts.archive import ArchiveLimits, extract_archive
from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats.base import BaseModelRef, ModelUpload, PreparedModel, StoredModel, archive_or_parts
from worker.artifacts.formats.hf import (
    MAX_CONFIG_BYTES,
    MAX_CONFIG_DEPTH,
    PICKLE_SUFFIXES,
    Head,
    load_model,
    merge_weights,
    meta_model,
    parameter_count,
    stored_architecture,
    stored_config,
)
from worker.artifacts.json_file import read_json_object
from worker.artifacts.safetensors_file import FLOAT_DTYPES, TensorInfo, iter_tensors, non_finite_reason, read_header
from worker.attribution.hooks import default_layers

PARTS: tuple[str, ...] = ("adapter_config", "weights", "archive")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_RANK = 1024
MAX_ALPHA = 65536.0
MAX_NAMES = 256  # entries of target_modules, modules_to_save, rank_pattern...
MAX_NAME_LENGTH = 200
MAX_LAYER_INDEX = 1024
MAX_NAMES_SHOWN = 8
PLAIN_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")  # a module name (suffix), no regular expression
TASK_TYPES: dict[Head, tuple[str | None, ...]] = {
    "causal_lm": (None, "CAUSAL_LM"),
    "sequence_classification": (None, "SEQ_CLS"),
    "image_classification": (None,),
}
INFORMATIONAL = ("base_model_name_or_path", "revision", "inference_mode", "peft_version")  # kept, never used
CHECKED = (
    "peft_type",
    "task_type",
    "auto_mapping",
    "r",
    "lora_alpha",
    "target_modules",
    "modules_to_save",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "lora_dropout",
    "fan_in_fan_out",
    "use_rslora",
    "lora_bias",
    "init_lora_weights",
)
NOT_SUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "bias": 'adapters that train the base biases (bias "all" / "lora_only") are not supported',
    "layer_replication": "layer replication changes the base model: not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "target_parameters": "adapters on parameters (target_parameters) are not supported",
    "exclude_modules": "exclude_modules is not supported: list the target_modules instead",
}


def _names(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


def _field(key: str) -> str:
    return f"adapter_config.{key}"


# --------------------------------------------------------------------------------------------- adapter_config


@dataclass(frozen=True)
class AdapterConfig:
    """A validated adapter_config.json, as stored."""

    raw: dict[str, Any]

    def lora_config(self) -> LoraConfig:
        """A new peft config (peft changes the config it is given)."""
        return _lora_config(self.raw)


def _default_config() -> LoraConfig:
    return LoraConfig()


def _json_value(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def parse_adapter_config(raw: dict[str, Any], head: Head, base: nn.Module) -> AdapterConfig:
    """A LoRA config from adapter_config.json, checked against the base model (built on the meta device)."""
    known = {f.name for f in dataclasses.fields(LoraConfig)} | {"peft_version"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ArtifactError(f"adapter_config.json has unknown keys: {_names(unknown)}", field=_field(unknown[0]))
    if raw.get("peft_type") != "LORA":
        raise ArtifactError(
            f'adapter_config.json peft_type is {raw.get("peft_type")!r}: only "LORA" adapters are accepted',
            field=_field("peft_type"),
        )
    default = _default_config()
    for key, reason in NOT_SUPPORTED.items():
        if key in raw and _json_value(raw[key]) != _json_value(getattr(default, key)):
            raise ArtifactError(f"adapter_config.json {key} = {raw[key]!r}: {reason}", field=_field(key))
    for key, value in raw.items():
        if key in CHECKED or key in INFORMATIONAL or key in NOT_SUPPORTED:
            continue
        if _json_value(value) != _json_value(getattr(default, key)):
            raise ArtifactError(
                f"adapter_config.json {key} = {value!r} is not supported (leave it at its default, "
                f"{getattr(default, key)!r})",
                field=_field(key),
            )
    task_type = raw.get("task_type")
    if task_type not in TASK_TYPES[head]:
        allowed = " or ".join("null" if t is None else repr(t) for t in TASK_TYPES[head])
        raise ArtifactError(
            f"adapter_config.json task_type {task_type!r} does not fit the base model's {head} head (use {allowed})",
            field=_field("task_type"),
        )
    _check_auto_mapping(raw.get("auto_mapping"), base)
    _check_rank_and_alpha(raw)
    module_names = [name for name, _ in base.named_modules() if name]
    _check_module_list(raw, "target_modules", module_names, required=True)
    _check_module_list(raw, "modules_to_save", module_names, required=False)
    _check_layers(raw)
    dropout = raw.get("lora_dropout", 0.0)
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ArtifactError("adapter_config.json lora_dropout must be a number in [0, 1)", field=_field("lora_dropout"))
    for key in ("fan_in_fan_out", "use_rslora", "lora_bias", "inference_mode"):
        if key in raw and not isinstance(raw[key], bool):
            raise ArtifactError(f"adapter_config.json {key} must be true or false", field=_field(key))
    init = raw.get("init_lora_weights", True)
    if not (isinstance(init, bool) or init == "gaussian"):
        raise ArtifactError(
            f"adapter_config.json init_lora_weights = {init!r}: adapters initialised from the base weights "
            "(PiSSA, OLoRA, LoftQ, EVA, CorDA...) change or depend on the base; convert the adapter to a plain "
            "LoRA adapter first",
            field=_field("init_lora_weights"),
        )
    for key in ("base_model_name_or_path", "revision", "peft_version"):
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > 1000):
            raise ArtifactError(f"adapter_config.json {key} must be a string", field=_field(key))
    _lora_config(raw)
    return AdapterConfig(raw=dict(raw))


def _lora_config(raw: dict[str, Any]) -> LoraConfig:
    """The peft config of the checked keys (informational ones left out: nothing is ever fetched)."""
    kwargs = {key: raw[key] for key in CHECKED if key in raw and key not in ("peft_type", "auto_mapping")}
    kwargs["init_lora_weights"] = False  # the weights are loaded: no initialisation work
    kwargs["inference_mode"] = False
    try:
        return LoraConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"adapter_config.json is not a valid LoRA config: {exc}", field="adapter_config") from None


def _check_auto_mapping(value: object, base: nn.Module) -> None:
    if value is None:
        return
    own = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    if value != own:
        raise ArtifactError(
            "adapter_config.json auto_mapping names code to import; it is accepted only as peft writes it for the "
            f"base model ({json.dumps(own)}) and is never used",
            field=_field("auto_mapping"),
        )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _check_rank_and_alpha(raw: dict[str, Any]) -> None:
    def rank(value: object, field: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RANK:
            raise ArtifactError(
                f"adapter_config.json {field}: the rank must be an integer in [1, {MAX_RANK}]", field=field
            )

    def alpha(value: object, field: str) -> None:
        number = _number(value)
        if number is None or not math.isfinite(number) or not 0.0 < number <= MAX_ALPHA:
            raise ArtifactError(
                f"adapter_config.json {field}: lora_alpha must be a number in (0, {MAX_ALPHA:g}]", field=field
            )

    rank(raw.get("r", 8), _field("r"))
    alpha(raw.get("lora_alpha", 8), _field("lora_alpha"))
    for key, check in (("rank_pattern", rank), ("alpha_pattern", alpha)):
        pattern = raw.get(key, {})
        if not isinstance(pattern, dict) or len(pattern) > MAX_NAMES:
            raise ArtifactError(
                f"adapter_config.json {key} must be an object of module name -> value", field=_field(key)
            )
        for name, value in pattern.items():
            _plain_name(name, _field(key))
            check(value, _field(f"{key}.{name}"))


def _plain_name(name: object, field: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME_LENGTH or not PLAIN_NAME.fullmatch(name):
        raise ArtifactError(
            f"adapter_config.json {field}: {name!r} is not a module name (letters, digits, _ and dots; regular "
            "expressions are not accepted)",
            field=field,
        )
    return name


def _check_module_list(raw: dict[str, Any], key: str, module_names: list[str], *, required: bool) -> None:
    value = raw.get(key)
    if value is None and not required:
        return
    if not isinstance(value, list) or not value or len(value) > MAX_NAMES:
        raise ArtifactError(
            f"adapter_config.json {key} must be a list of module names (at most {MAX_NAMES}); a regular "
            "expression string is not accepted",
            field=_field(key),
        )
    absent = []
    for entry in value:
        name = _plain_name(entry, _field(key))
        if not any(module == name or module.endswith(f".{name}") for module in module_names):
            absent.append(name)
    if absent:
        raise ArtifactError(
            f"adapter_config.json {key} names modules that the base model does not have: {_names(absent)}",
            field=_field(key),
        )


def _check_layers(raw: dict[str, Any]) -> None:
    layers = raw.get("layers_to_transform")
    indices = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
    if indices is not None and (
        not isinstance(indices, list)
        or len(indices) > MAX_LAYER_INDEX
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_LAYER_INDEX for i in indices)
    ):
        raise ArtifactError(
            f"adapter_config.json layers_to_transform must be layer indices in [0, {MAX_LAYER_INDEX})",
            field=_field("layers_to_transform"),
        )
    pattern = raw.get("layers_pattern")
    names = [pattern] if isinstance(pattern, str) else pattern
    if names is not None:
        if not isinstance(names, list) or len(names) > MAX_NAMES:
            raise ArtifactError(
                "adapter_config.json layers_pattern must be module names", field=_field("layers_pattern")
            )
        for name in names:
            _plain_name(name, _field("layers_pattern"))


# --------------------------------------------------------------------------------------------- the model


def adapter_on(base: nn.Module, adapter: AdapterConfig) -> PeftModel:
    """The base model wrapped with the adapter (peft's own class for the task type), weights not loaded yet."""
    try:
        model = get_peft_model(base, adapter.lora_config())
    except Exception as exc:  # noqa: BLE001 - a config that peft cannot apply to this base is the upload's fault
        raise ArtifactError(f"the adapter cannot be applied to the base model: {exc}", field="adapter_config") from None
    if not isinstance(model, PeftModel):
        raise ArtifactError("the adapter did not build a peft model", field="adapter_config")
    return model


def meta_adapter(architecture: dict[str, Any]) -> tuple[AdapterConfig, PeftModel]:
    """A stored LoRA model's adapter config, checked again, and the base with the adapter on the meta device
    (names and shapes only)."""
    head = stored_architecture(architecture).head
    raw = architecture.get("adapter_config")
    if not isinstance(raw, dict):
        raise ArtifactError('the stored model is not a format "lora" model', field="model")
    with torch.device("meta"):
        base = meta_model(stored_config(architecture), head)
        adapter = parse_adapter_config(raw, head, base)
        return adapter, adapter_on(base, adapter)


def expected_tensors(model: PeftModel) -> dict[str, tuple[int, ...]]:
    """The adapter file's tensor names (peft's ``save_pretrained`` names) and shapes."""
    return {name: tuple(tensor.shape) for name, tensor in get_peft_model_state_dict(model).items()}


def check_adapter_weights(infos: dict[str, TensorInfo], expected: dict[str, tuple[int, ...]], field: str) -> None:
    """The file's tensors must be exactly the adapter's, with its shapes, floating point."""
    problems = []
    missing = sorted(set(expected) - set(infos))
    unexpected = sorted(set(infos) - set(expected))
    if missing:
        problems.append(f"missing tensors: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_names(unexpected)}")
    for name in sorted(set(infos) & set(expected)):
        info = infos[name]
        if info.shape != expected[name]:
            problems.append(
                f"tensor {name!r} has shape {list(info.shape)} in the file but the adapter expects "
                f"{list(expected[name])}"
            )
        elif info.dtype not in FLOAT_DTYPES:
            problems.append(f"tensor {name!r} has dtype {info.dtype}; adapter weights are floating point")
    if problems:
        raise ArtifactError(f"the adapter weights do not fit adapter_config.json: {'; '.join(problems)}", field=field)


def load_adapter_model(architecture: dict[str, Any], base_weights: Path, adapter_weights: Path) -> PeftModel:
    """The base model (loaded strictly as format ``hf`` does) with the adapter and its weights; eval mode."""
    adapter, meta = meta_adapter(architecture)
    check_adapter_weights(read_header(adapter_weights, field="weights"), expected_tensors(meta), "weights")
    model = adapter_on(load_model(stored_architecture(architecture).to_json(), base_weights), adapter)
    tensors = load_file(str(adapter_weights))
    result = set_peft_model_state_dict(model, {name: t.to(torch.float32) for name, t in tensors.items()})
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:  # the names were checked above: a peft that maps them otherwise is caught here
        raise ArtifactError(f"unexpected adapter tensors: {_names(unexpected)}", field="weights")
    model.train(False)
    return model


# --------------------------------------------------------------------------------------------- the upload


@dataclass(frozen=True)
class AdapterFiles:
    config: Path
    weights: Path


def collect_files(upload: ModelUpload, work_dir: Path) -> AdapterFiles:
    archive = archive_or_parts(upload, PARTS, "lora")
    if archive is not None:
        return _archive_files(archive, work_dir / "archive", upload.max_unpacked_bytes)
    files = upload.files
    for part in PARTS[:2]:
        if len(files.get(part, [])) != 1:
            raise ArtifactError(
                f'format "lora" needs one `{part}` part ({ADAPTER_CONFIG if part == "adapter_config" else ADAPTER_WEIGHTS})'
                " or an `archive`",
                field=part,
            )
    weights = files["weights"][0]
    if weights.name.endswith(PICKLE_SUFFIXES):
        raise ArtifactError(
            f"{weights.name!r} is a pickle file, which is never loaded: upload safetensors", field="weights"
        )
    return AdapterFiles(config=files["adapter_config"][0], weights=weights)


def _archive_files(archive: Path, target: Path, max_bytes: int) -> AdapterFiles:
    target.mkdir(parents=True)
    written = extract_archive(archive, target, ArchiveLimits(max_bytes=max_bytes))
    pickles = [str(p) for p in written if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ArtifactError(
            f"the archive holds pickle files ({', '.join(sorted(pickles)[:4])}), which are never loaded: save the "
            "adapter with safetensors (save_pretrained's default)",
            field="archive",
        )
    configs = [p for p in written if p.name == ADAPTER_CONFIG]
    if len(configs) != 1:
        raise ArtifactError(
            f"the archive must hold exactly one {ADAPTER_CONFIG} (a peft save_pretrained folder)", field="archive"
        )
    root = configs[0].parent
    weights = [p for p in written if p.parent == root and p.suffix == ".safetensors"]
    if len(weights) != 1:
        raise ArtifactError(
            f"the archive must hold one .safetensors file ({ADAPTER_WEIGHTS}) next to {ADAPTER_CONFIG}",
            field="archive",
        )
    return AdapterFiles(config=target / configs[0], weights=target / weights[0])


def _base(upload: ModelUpload) -> BaseModelRef:
    base = upload.base
    if base is None:
        raise ArtifactError(
            'format "lora" needs metadata.base_model_id: the stored format "hf" model the adapter was trained on',
            field="metadata.base_model_id",
        )
    if base.format != "hf":
        raise ArtifactError(
            f'the base model {base.model_id!r} has format {base.format!r}: a LoRA adapter needs a format "hf" base',
            field="metadata.base_model_id",
        )
    if upload.task != base.stored.task:
        raise ArtifactError(
            f"metadata.task must be the base model's task {json.dumps(base.stored.task)}", field="metadata.task"
        )
    return base


class LoraFormat:
    name = "lora"
    parts = PARTS
    description = (
        "A peft LoRA adapter on a stored `hf` model (`metadata.base_model_id`): `adapter_config` "
        "(adapter_config.json) and `weights` (adapter_model.safetensors), or one `archive` (.tar, .tar.gz, .zip) "
        "of the adapter's save_pretrained folder."
    )

    def prepare(self, upload: ModelUpload, work_dir: Path) -> PreparedModel:
        if upload.architecture:
            raise ArtifactError(
                'format "lora" takes its architecture from the base model and `adapter_config`: leave '
                "metadata.architecture out",
                field="metadata.architecture",
            )
        base = _base(upload)
        files = collect_files(upload, work_dir)
        raw = read_json_object(
            files.config, field="adapter_config", max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH
        )
        hf = stored_architecture(base.stored.architecture)
        with torch.device("meta"):
            meta_base = meta_model(stored_config(base.stored.architecture), hf.head)
        adapter = parse_adapter_config(raw, hf.head, meta_base)
        with torch.device("meta"):
            meta = adapter_on(meta_base, adapter)
        count = parameter_count(meta)
        if count > upload.max_parameters:
            raise ArtifactError(
                f"the base model with the adapter has {count:,} parameters, over the limit of "
                f"{upload.max_parameters:,}",
                field="adapter_config",
            )
        headers = {files.weights: read_header(files.weights, field="weights")}
        check_adapter_weights(headers[files.weights], expected_tensors(meta), "weights")
        weights = merge_weights(headers, work_dir / ADAPTER_WEIGHTS)
        architecture = {**hf.to_json(), "adapter_config": adapter.raw, "base_model_id": base.model_id}
        linked = {**base.files_sha256, "base_weights": base.weights_sha256}
        stored = StoredModel(
            architecture=architecture,
            task=upload.task,
            weights=weights,
            files={**base.stored.files, "base_weights": base.stored.weights},
        )
        self.build(stored)  # proves the stored pieces load as the worker will load them
        return PreparedModel(
            architecture=architecture,
            weights=weights,
            num_parameters=count,
            tracked_layers=default_layers(meta),
            linked_files=linked,
        )

    def build(self, stored: StoredModel) -> nn.Module:
        base_weights = stored.files.get("base_weights")
        if base_weights is None:
            raise ArtifactError("the stored LoRA model has no base weights", field="model")
        return load_adapter_model(stored.architecture, base_weights, stored.weights)

    def check_weights(self, architecture: dict[str, Any], task: dict[str, Any], weights: Path) -> None:
        """A checkpoint of a LoRA model is adapter weights (the base stays as stored)."""
        infos = read_header(weights, field="weights")
        check_adapter_weights(infos, expected_tensors(meta_adapter(architecture)[1]), "weights")
        for name, tensor in iter_tensors(weights, list(infos), field="weights"):
            reason = non_finite_reason(tensor)
            if reason:
                raise ArtifactError(f"tensor {name!r} contains {reason} values", field="weights")

    def weights_to_store(self, module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not isinstance(module, PeftModel):
            raise ArtifactError("a LoRA model's module is a peft model", field="model")
        adapter: dict[str, torch.Tensor] = get_peft_model_state_dict(module, state_dict=state)
        return adapter

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parts": list(self.parts),
            "base_formats": ["hf"],
            "peft_types": ["LORA"],
            "max_rank": MAX_RANK,
            "max_alpha": MAX_ALPHA,
            "archives": [".tar", ".tar.gz", ".zip"],
            "peft_version": peft.__version__,
        }
