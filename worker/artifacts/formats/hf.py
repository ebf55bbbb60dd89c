"""``format: "hf"``: a Hugging Face ``transformers`` model from its config.json and safetensors weights.

What is accepted, and how it is checked before anything is allocated:

- the model class comes from ``ALLOWED_MODEL_TYPES``, types that ``transformers`` implements itself, with the
  head the task names (``causal_lm`` -> AutoModelForCausalLM, ``sequence_classification``,
  ``image_classification``); ``trust_remote_code`` is never passed on and a config with ``auto_map`` (custom
  code) or ``quantization_config`` is refused;
- config.json is a JSON object of bounded size and nesting; the model is built from it on the meta device and
  its parameters are counted against the limit before any memory is allocated;
- weights are safetensors only (a ``.bin`` / ``.pt`` pickle is refused); one file, or shards with their
  ``model.safetensors.index.json``; the tensor names and shapes must be exactly the model's (tied weights,
  such as GPT-2's ``lm_head.weight``, may be left out as ``save_pretrained`` does); shards are merged into
  one stored file whose names are the model's state_dict names;
- an ``archive`` part (a ``save_pretrained`` folder as .tar, .tar.gz or .zip) is extracted safely
  (worker.artifacts.archive) and read as the same files;
- tokenizer.json is validated by loading it with the ``tokenizers`` library (data only, no code runs).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.pytorch_utils import Conv1D

from worker.artifacts.archive import ArchiveLimits, extract_archive
from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats.base import ModelUpload, PreparedModel, StoredModel, archive_or_parts
from worker.artifacts.json_file import read_json_object
from worker.artifacts.safetensors_file import INT_DTYPES, TensorInfo, iter_tensors, non_finite_reason, read_header
from worker.artifacts.tokenizer import check_tokenizer_config, load_tokenizer

Head = Literal["causal_lm", "sequence_classification", "image_classification"]
HEADS: dict[Head, tuple[str, ...]] = {
    "causal_lm": ("gpt2", "llama", "qwen2", "mistral"),
    "sequence_classification": ("gpt2", "llama", "qwen2", "mistral", "bert", "roberta", "distilbert"),
    "image_classification": ("vit",),
}
ALLOWED_MODEL_TYPES: tuple[str, ...] = ("gpt2", "llama", "qwen2", "mistral", "bert", "roberta", "distilbert", "vit")
REFUSED_CONFIG_KEYS = {
    "auto_map": "custom model code (`auto_map`) is never run: use a model_type that transformers implements",
    "quantization_config": "quantized models are not accepted: upload float weights",
}
MAX_CONFIG_BYTES = 1024 * 1024
MAX_CONFIG_DEPTH = 16
MAX_LAYERS = 1024  # built one by one even on the meta device: bounded before building
MAX_TOKENIZER_CONFIG_BYTES = 1024 * 1024
MAX_INDEX_BYTES = 16 * 1024 * 1024
MAX_SHARDS = 256
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_NAMES_SHOWN = 8
PARTS: tuple[str, ...] = ("config", "weights", "weights_index", "tokenizer", "tokenizer_config", "archive")
# the files of a save_pretrained folder that an archive is read as (others, e.g. generation_config.json, are ignored)
ARCHIVE_FILES = {
    "config.json": "config",
    "model.safetensors.index.json": "weights_index",
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer_config",
}
LOSSES_BY_HEAD: dict[Head, tuple[str, ...]] = {
    "causal_lm": ("causal_lm",),
    "sequence_classification": ("cross_entropy", "mse"),
    "image_classification": ("cross_entropy", "mse"),
}


@dataclass(frozen=True)
class HfArchitecture:
    """What is stored as the model's ``architecture``: the validated config.json and the head."""

    config: dict[str, Any]
    head: Head
    tokenizer_config: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "head": self.head, "tokenizer_config": self.tokenizer_config}


def task_head(task: dict[str, Any]) -> Head:
    """The model head a task asks for: ``causal_lm`` for that loss, else ``task.head`` (required)."""
    loss, head = task.get("loss"), task.get("head")
    if loss == "causal_lm":
        if head not in (None, "causal_lm"):
            raise ArtifactError('task loss "causal_lm" takes no other head', field="metadata.task.head")
        return "causal_lm"
    classifier = as_head(head)
    if classifier in ("sequence_classification", "image_classification"):
        if loss not in LOSSES_BY_HEAD[classifier]:
            raise ArtifactError(f"head {head!r} takes loss cross_entropy or mse", field="metadata.task.loss")
        return classifier
    raise ArtifactError(
        'format "hf" needs task {"loss": "causal_lm"} or {"loss": "cross_entropy" | "mse", '
        '"head": "sequence_classification" | "image_classification"}',
        field="metadata.task.head",
    )


def as_head(value: object) -> Head | None:
    for head in HEADS:
        if value == head:
            return head
    return None


def parse_config(raw: dict[str, Any], head: Head) -> PretrainedConfig:
    """A transformers config from a config.json object, on the allow-list, without any remote code."""
    for key, reason in REFUSED_CONFIG_KEYS.items():
        if key in raw:
            raise ArtifactError(f"config.json has {key!r}: {reason}", field=f"config.{key}")
    if raw.get("trust_remote_code"):
        raise ArtifactError("trust_remote_code is never used", field="config.trust_remote_code")
    model_type = raw.get("model_type")
    if not isinstance(model_type, str) or model_type not in ALLOWED_MODEL_TYPES:
        raise ArtifactError(
            f"config.json model_type {model_type!r} is not accepted; allowed: {', '.join(ALLOWED_MODEL_TYPES)}",
            field="config.model_type",
        )
    if model_type not in HEADS[head]:
        raise ArtifactError(
            f"model_type {model_type!r} has no {head} head here; {head} takes: {', '.join(HEADS[head])}",
            field="config.model_type",
        )
    config_class: type[PretrainedConfig] = transformers.CONFIG_MAPPING[model_type]
    try:
        config = config_class.from_dict(dict(raw))
    except Exception as exc:  # noqa: BLE001 - any failure on user-given values means an invalid config
        raise ArtifactError(f"config.json is not a valid {model_type} config: {exc}", field="config") from None
    if not isinstance(config, PretrainedConfig):
        raise ArtifactError("config.json could not be read", field="config")
    layers = getattr(config, "num_hidden_layers", 0)
    if not isinstance(layers, int) or layers > MAX_LAYERS:
        raise ArtifactError(f"config.json has {layers} layers (at most {MAX_LAYERS})", field="config.num_hidden_layers")
    return config


def _auto_class(head: Head) -> Any:
    return {
        "causal_lm": AutoModelForCausalLM,
        "sequence_classification": AutoModelForSequenceClassification,
        "image_classification": AutoModelForImageClassification,
    }[head]


def instantiate(config: PretrainedConfig, head: Head) -> PreTrainedModel:
    """The model class for this head, built with the config's sizes (on the current default device)."""
    try:
        model = _auto_class(head).from_config(config, trust_remote_code=False, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - a config's sizes can fail the build in any way (a 422, not a 500)
        raise ArtifactError(
            f"config.json does not describe a buildable {config.model_type} model: {exc}", field="config"
        ) from None
    if not isinstance(model, PreTrainedModel):
        raise ArtifactError("config.json does not describe a transformers model", field="config")
    return model


def meta_model(config: PretrainedConfig, head: Head) -> PreTrainedModel:
    """The model on the meta device: shapes and names, no memory."""
    with torch.device("meta"):
        return instantiate(config, head)


def parameter_count(model: nn.Module) -> int:
    """Parameters, tied ones counted once (``parameters()`` yields each tensor once)."""
    return sum(p.numel() for p in model.parameters())


def tracked_layers(model: nn.Module) -> list[str]:
    """The layers an attribution tracks when none are named: nn.Linear and transformers' Conv1D (a Linear with a
    transposed weight), in module order; an output layer whose weight is tied to another module's (GPT-2's
    ``lm_head``, tied to the token embedding) is left out, and so is the output embedding (the LM head, tied or
    not), which the engine leaves out by default too (``worker.attribution.hooks.default_layers``)."""
    owner: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter):
            owner.setdefault(id(weight), name)
    getter = getattr(model, "get_output_embeddings", None)
    output_embeddings = getter() if callable(getter) else None
    names = []
    for name, module in model.named_modules():
        if module is output_embeddings:
            continue
        if isinstance(module, (nn.Linear, Conv1D)) and owner.get(id(module.weight)) == name:
            names.append(name)
    return names


def _names(names: list[str]) -> str:
    shown = ", ".join(sorted(names)[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return shown + (f" (and {more} more)" if more > 0 else "")


# --------------------------------------------------------------------------------------------- the upload


@dataclass(frozen=True)
class HfFiles:
    """The files of one upload, from parts or from an extracted archive."""

    config: Path
    weights: list[Path]
    weights_index: Path | None
    tokenizer: Path | None
    tokenizer_config: Path | None


def collect_files(upload: ModelUpload, work_dir: Path) -> HfFiles:
    archive = archive_or_parts(upload, PARTS, "hf")
    if archive is not None:
        return _archive_files(archive, work_dir / "archive", upload.max_unpacked_bytes)
    files = upload.files
    for part in ("config", "weights_index", "tokenizer", "tokenizer_config"):
        if len(files.get(part, [])) > 1:
            raise ArtifactError(f"the `{part}` part is given {len(files[part])} times", field=part)
    if "config" not in files:
        raise ArtifactError('format "hf" needs a `config` part (config.json) or an `archive`', field="config")
    if not files.get("weights"):
        raise ArtifactError('format "hf" needs a `weights` part (safetensors) or an `archive`', field="weights")

    def one(part: str) -> Path | None:
        return files[part][0] if part in files else None

    return HfFiles(
        config=files["config"][0],
        weights=list(files["weights"]),
        weights_index=one("weights_index"),
        tokenizer=one("tokenizer"),
        tokenizer_config=one("tokenizer_config"),
    )


def _archive_files(archive: Path, target: Path, max_bytes: int) -> HfFiles:
    target.mkdir(parents=True)
    written = extract_archive(archive, target, ArchiveLimits(max_bytes=max_bytes))
    pickles = [str(p) for p in written if p.name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ArtifactError(
            f"the archive holds pickle files ({', '.join(sorted(pickles)[:4])}), which are never "
            "loaded: save the model with safetensors (save_pretrained's default)",
            field="archive",
        )
    roots = {p.parent for p in written if p.name == "config.json"}
    if len(roots) != 1:
        raise ArtifactError(
            "the archive must hold exactly one config.json (a save_pretrained folder)"
            if roots
            else "the archive holds no config.json",
            field="archive",
        )
    root = roots.pop()
    found: dict[str, Path] = {}
    weights: list[Path] = []
    for relative in written:
        if relative.parent != root:
            continue
        if relative.name in ARCHIVE_FILES:
            found[ARCHIVE_FILES[relative.name]] = target / relative
        elif relative.suffix == ".safetensors":
            weights.append(target / relative)
    if not weights:
        raise ArtifactError("the archive holds no .safetensors weights next to config.json", field="archive")
    return HfFiles(
        config=found["config"],
        weights=sorted(weights),
        weights_index=found.get("weights_index"),
        tokenizer=found.get("tokenizer"),
        tokenizer_config=found.get("tokenizer_config"),
    )


def shard_plan(files: HfFiles) -> dict[Path, dict[str, TensorInfo]]:
    """Each weights file's checked header; with several files, the index must name exactly their tensors."""
    for path in files.weights:
        if path.name.endswith(PICKLE_SUFFIXES):
            raise ArtifactError(
                f"{path.name!r} is a pickle file, which is never loaded: upload safetensors", field="weights"
            )
    headers = {path: read_header(path, field="weights") for path in files.weights}
    if len(files.weights) > MAX_SHARDS:
        raise ArtifactError(f"{len(files.weights)} weight shards (at most {MAX_SHARDS})", field="weights")
    seen: dict[str, Path] = {}
    for path, infos in headers.items():
        for name in infos:
            if name in seen:
                raise ArtifactError(f"tensor {name!r} is in two weight files", field="weights")
            seen[name] = path
    if len(files.weights) > 1 and files.weights_index is None:
        raise ArtifactError(
            "several `weights` parts need the `weights_index` part (model.safetensors.index.json)",
            field="weights_index",
        )
    if files.weights_index is not None:
        _check_index(files, headers)
    return headers


def _check_index(files: HfFiles, headers: dict[Path, dict[str, TensorInfo]]) -> None:
    assert files.weights_index is not None
    index = read_json_object(
        files.weights_index, field="weights_index", max_bytes=MAX_INDEX_BYTES, max_depth=MAX_CONFIG_DEPTH
    )
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ArtifactError(
            "the index has no `weight_map` object of tensor name -> file name", field="weights_index.weight_map"
        )
    in_files = {name for infos in headers.values() for name in infos}
    listed = set(weight_map)
    if listed != in_files:
        missing = sorted(listed - in_files)
        extra = sorted(in_files - listed)
        detail = "; ".join(
            part
            for part in (
                f"listed but in no weights file: {_names(missing)}" if missing else "",
                f"in a weights file but not listed: {_names(extra)}" if extra else "",
            )
            if part
        )
        raise ArtifactError(f"the index does not match the weights files: {detail}", field="weights_index")


def merge_weights(headers: dict[Path, dict[str, TensorInfo]], target: Path) -> Path:
    """One safetensors file of every tensor, floating ones as float32, finite values checked; the single uploaded
    file itself when it already is that."""
    tensors: dict[str, torch.Tensor] = {}
    for path, infos in headers.items():
        for name, tensor in iter_tensors(path, list(infos), field="weights"):
            reason = non_finite_reason(tensor)
            if reason:
                raise ArtifactError(f"tensor {name!r} contains {reason} values", field="weights")
            tensors[name] = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
    if len(headers) == 1 and all(info.dtype in ("F32", *INT_DTYPES) for info in next(iter(headers.values())).values()):
        return next(iter(headers))
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(target))
    return target


class HfFormat:
    name = "hf"
    parts = PARTS
    description = (
        "A Hugging Face transformers model: `config` (config.json), `weights` (safetensors; repeat for "
        "shards with `weights_index`), optional `tokenizer` and `tokenizer_config`; or one `archive` "
        "(.tar, .tar.gz, .zip) of a save_pretrained folder."
    )

    def prepare(self, upload: ModelUpload, work_dir: Path) -> PreparedModel:
        if upload.architecture:
            raise ArtifactError(
                'format "hf" takes its architecture from the `config` part: leave metadata.architecture out',
                field="metadata.architecture",
            )
        head = task_head(upload.task)
        files = collect_files(upload, work_dir)
        raw = read_json_object(files.config, field="config", max_bytes=MAX_CONFIG_BYTES, max_depth=MAX_CONFIG_DEPTH)
        config = parse_config(raw, head)
        model = meta_model(config, head)
        count = parameter_count(model)
        if count > upload.max_parameters:
            raise ArtifactError(
                f"config.json describes {count:,} parameters, over the limit of {upload.max_parameters:,}",
                field="config",
            )
        headers = shard_plan(files)
        tokenizer_config = None
        if files.tokenizer_config is not None:
            tokenizer_config = check_tokenizer_config(files.tokenizer_config)
        extra: dict[str, Path] = {}
        if files.tokenizer is not None:
            load_tokenizer(files.tokenizer)
            extra["tokenizer"] = files.tokenizer
        weights = merge_weights(headers, work_dir / "model.safetensors")
        architecture = HfArchitecture(config=raw, head=head, tokenizer_config=tokenizer_config)
        stored = StoredModel(architecture=architecture.to_json(), task=upload.task, weights=weights)
        built = self.build(stored)  # proves the stored pieces load as the worker will load them
        return PreparedModel(
            architecture=architecture.to_json(),
            weights=weights,
            num_parameters=count,
            tracked_layers=tracked_layers(built),
            extra_files=extra,
        )

    def build(self, stored: StoredModel) -> nn.Module:
        return load_model(stored.architecture, stored.weights)

    def check_weights(self, architecture: dict[str, Any], task: dict[str, Any], weights: Path) -> None:
        load_model(architecture, weights)

    def weights_to_store(self, module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return untied_state(module, state)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parts": list(self.parts),
            "model_types": list(ALLOWED_MODEL_TYPES),
            "heads": {head: list(types) for head, types in HEADS.items()},
            "losses": {head: list(losses) for head, losses in LOSSES_BY_HEAD.items()},
            "archives": [".tar", ".tar.gz", ".zip"],
            "transformers_version": transformers.__version__,
        }


def untied_state(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with one name per tied tensor (GPT-2's ``lm_head.weight`` is the token embedding), the first, as
    ``save_pretrained`` writes it (the loader ties the others again). When a tied name's value in ``state`` was
    changed (an edit that tracked the LM head), the changed value is the one kept."""
    first: dict[int, str] = {}
    kept: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name not in state:
            continue
        owner = first.setdefault(id(tensor), name)
        if owner == name:
            kept[name] = state[name]
        elif not torch.equal(state[name].detach().cpu(), tensor.detach().cpu()):
            kept[owner] = state[name]
    return kept


def stored_architecture(architecture: dict[str, Any]) -> HfArchitecture:
    head = as_head(architecture.get("head"))
    config = architecture.get("config")
    if head is None or not isinstance(config, dict):
        raise ArtifactError('the stored model is not a format "hf" model', field="model")
    tokenizer_config = architecture.get("tokenizer_config")
    return HfArchitecture(config=config, head=head, tokenizer_config=tokenizer_config)


def stored_config(architecture: dict[str, Any]) -> PretrainedConfig:
    hf = stored_architecture(architecture)
    return parse_config(hf.config, hf.head)


def load_model(architecture: dict[str, Any], weights: Path) -> PreTrainedModel:
    """The model rebuilt from the stored config and one safetensors file by transformers' own loader (which knows
    each model's checkpoint names), strictly: a missing, unexpected or mis-shaped tensor is an ArtifactError
    naming it; values must be finite. No pickle (safetensors only), no remote code, nothing fetched. In eval
    mode, float32, on the CPU."""
    hf = stored_architecture(architecture)
    config = parse_config(hf.config, hf.head)
    read_header(weights, field="weights")  # the header is checked before the library reads the file
    with tempfile.TemporaryDirectory(prefix="hf-model-") as folder:
        (Path(folder) / "config.json").write_text(json.dumps(hf.config))  # the generation config falls back on it
        (Path(folder) / "model.safetensors").symlink_to(weights.resolve())
        try:
            model, info = _auto_class(hf.head).from_pretrained(
                folder,
                config=config,
                output_loading_info=True,
                trust_remote_code=False,
                use_safetensors=True,
                local_files_only=True,
                dtype=torch.float32,
                ignore_mismatched_sizes=True,
            )
        except Exception as exc:  # noqa: BLE001 - whatever the loader trips on, the uploaded weights are at fault
            raise ArtifactError(f"the weights could not be loaded into the model: {exc}", field="weights") from None
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing tensors: {_names(sorted(info['missing_keys']))}")
    if info["unexpected_keys"]:
        problems.append(f"unexpected tensors: {_names(sorted(info['unexpected_keys']))}")
    for name, found, expected in sorted(info["mismatched_keys"]):
        problems.append(f"tensor {name!r} has shape {list(found)} in the file but the model expects {list(expected)}")
    if info["error_msgs"]:
        problems.append("; ".join(str(message) for message in info["error_msgs"]))
    if problems:
        raise ArtifactError(f"weights do not fit config.json: {'; '.join(problems)}", field="weights")
    if not isinstance(model, PreTrainedModel):
        raise ArtifactError("the weights did not load into a transformers model", field="weights")
    for name, tensor in model.state_dict().items():
        reason = non_finite_reason(tensor)
        if reason:
            raise ArtifactError(f"tensor {name!r} contains {reason} values", field="weights")
    model.train(False)
    return model
