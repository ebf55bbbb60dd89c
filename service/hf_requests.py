"""Up-front checks of an attribution or fit on a `format: "hf"` (or `"lora"`) model (see service.attribution_requests).

The spec path runs the architecture on the meta device; a Hugging Face model is checked from its stored config
instead: the dataset must be of the model's kind (token ids for a language model or text classifier, images for
an image classifier), its token ids below the vocabulary size, its rows no longer than the model's positions,
and its targets within the classifier's labels.
"""

from __future__ import annotations

from service.db.tables import Dataset, Model
from service.problems import invalid
from worker.artifacts.errors import ArtifactError
from worker.artifacts.formats import HF_FORMATS
from worker.artifacts.formats.hf import stored_architecture, stored_config
from worker.artifacts.text_datasets import STORED_FORMAT, check_fits_model


def check_hf_inputs(model: Model, dataset: Dataset, field: str) -> None:
    if model.format not in HF_FORMATS:
        raise invalid(
            f'dataset {dataset.id!r} holds token ids: it needs a Hugging Face model (format "hf"), not '
            f"model {model.id!r} (format {model.format!r})",
            field,
        )
    head = stored_architecture(model.architecture).head
    config = stored_config(model.architecture)
    is_text = dataset.format == STORED_FORMAT
    if head == "image_classification":
        if is_text:
            raise invalid(f"model {model.id!r} classifies images; dataset {dataset.id!r} holds text", field)
        shape = dataset.fields["inputs"]["shape"][1:]
        expected = [int(config.num_channels), int(config.image_size), int(config.image_size)]
        if shape != expected:
            raise invalid(
                f"the inputs of dataset {dataset.id!r} have shape {shape}; model {model.id!r} takes "
                f"images of shape {expected}",
                field,
            )
        _check_classes(model, dataset, config.num_labels or 1, field)
        return
    if not is_text:
        raise invalid(
            f"model {model.id!r} is a Hugging Face text model: it needs a text dataset (`input_ids`...); "
            f"dataset {dataset.id!r} is not one",
            field,
        )
    try:
        check_fits_model(
            dataset.fields, getattr(config, "vocab_size", None), getattr(config, "max_position_embeddings", None), field
        )
    except ArtifactError as exc:
        raise invalid(f"dataset {dataset.id!r} does not fit model {model.id!r}: {exc.detail}", field) from None
    if head == "causal_lm" and "labels" not in dataset.fields:
        raise invalid(
            f"model {model.id!r} is a causal language model: dataset {dataset.id!r} has `targets` "
            "(classification) instead of token labels",
            field,
        )
    if head == "sequence_classification":
        if "targets" not in dataset.fields:
            raise invalid(f"model {model.id!r} classifies sequences: dataset {dataset.id!r} needs `targets`", field)
        _check_classes(model, dataset, config.num_labels or 1, field)


def _check_classes(model: Model, dataset: Dataset, num_labels: int, field: str) -> None:
    targets = dataset.fields.get("targets", {})
    shape = targets.get("shape", [])
    if model.task.get("loss") == "cross_entropy" and (
        len(shape) != 1 or not str(targets.get("dtype")).startswith("int")
    ):
        raise invalid(f"dataset {dataset.id!r}: cross_entropy needs integer class targets of shape (N,)", field)
    if model.task.get("loss") == "cross_entropy" and int(targets.get("max", 0)) >= num_labels:
        raise invalid(
            f"dataset {dataset.id!r} has class targets up to {targets.get('max')}; model {model.id!r} has "
            f"{num_labels} labels",
            field,
        )
    if model.task.get("loss") == "mse" and shape[1:] != [num_labels] and not (num_labels == 1 and len(shape) == 1):
        raise invalid(
            f"dataset {dataset.id!r}: mse targets of shape {shape} do not match the model's {num_labels} outputs", field
        )
