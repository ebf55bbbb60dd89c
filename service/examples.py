"""Some examples of a stored dataset, picked by the caller's ids (for the results page and the SDK)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from service.db.tables import Dataset, Model
from service.problems import ProblemError, invalid
from service.schemas.datasets import DatasetExample, DatasetExamples
from service.storage import BlobStore
from worker.artifacts.datasets import DatasetArrays, read_dataset
from worker.artifacts.text_datasets import STORED_FORMAT, TextArrays, read_stored
from worker.loading import load_model_tokenizer

MAX_EXAMPLES = 100  # ids per request
MAX_VALUES = 2_000_000  # input values per response, all examples together


def positions_of(ids: np.ndarray, wanted: list[str], dataset_id: str) -> list[int]:
    """Row positions of the wanted ids (given as strings), in the order asked; 404 naming any unknown id."""
    keys = parse_ids(wanted, as_strings=ids.dtype.kind == "U")
    matched = np.flatnonzero(np.isin(ids, keys))
    position_of = {ids[p].item(): int(p) for p in matched}
    missing = [ident for ident, key in zip(wanted, keys.tolist(), strict=True) if key not in position_of]
    if missing:
        shown = ", ".join(repr(ident) for ident in missing[:10])
        raise ProblemError(404, f"dataset {dataset_id!r} has no example with id {shown}", kind="not-found")
    return [position_of[key] for key in keys.tolist()]


def parse_ids(wanted: list[str], as_strings: bool) -> np.ndarray:
    if as_strings:
        return np.asarray(wanted, dtype=str)
    try:
        return np.asarray([int(ident) for ident in wanted], dtype=np.int64)
    except (ValueError, OverflowError):
        raise invalid(f"the dataset's ids are integers; not all of {wanted[:10]!r} are", "query.ids") from None


def _check_values(per_example: int, count: int) -> None:
    if per_example * count > MAX_VALUES:
        raise invalid(
            f"{count} examples of {per_example} values each are over the limit of {MAX_VALUES} "
            f"values per request; ask for fewer ids",
            "query.ids",
        )


def select_examples(arrays: DatasetArrays, dataset: Dataset, wanted: list[str]) -> DatasetExamples:
    positions = positions_of(arrays.ids, wanted, dataset.id)
    _check_values(int(np.prod(arrays.inputs.shape[1:], dtype=np.int64)), len(positions))
    examples = [
        DatasetExample(
            id=arrays.ids[p].item(),
            input=arrays.inputs[p].tolist(),
            target=arrays.targets[p].tolist(),
            task=None if arrays.task is None else int(arrays.task[p]),
            split=None if arrays.split is None else int(arrays.split[p]),
        )
        for p in positions
    ]
    return DatasetExamples(dataset_id=dataset.id, input_shape=list(arrays.inputs.shape[1:]), examples=examples)


def select_text_examples(
    text: TextArrays, dataset: Dataset, wanted: list[str], tokenizer: Tokenizer | None, tokenizer_model_id: str | None
) -> DatasetExamples:
    """Text examples: the real tokens' ids (padding left out, on either side), their labels or the class, and the
    text decoded when a tokenizer is known."""
    positions = positions_of(text.ids, wanted, dataset.id)
    _check_values(int(text.input_ids.shape[1]), len(positions))
    examples = []
    for p in positions:
        real = text.attention_mask[p] != 0
        token_ids = text.input_ids[p][real].tolist()
        if text.labels is not None:
            target: object = text.labels[p][real].tolist()
        else:
            assert text.targets is not None
            target = text.targets[p].tolist()
        examples.append(
            DatasetExample(
                id=text.ids[p].item(),
                input=token_ids,
                target=target,
                text=None if tokenizer is None else tokenizer.decode(token_ids, skip_special_tokens=False),
                tokens=None
                if tokenizer is None
                else [tokenizer.decode([token], skip_special_tokens=False) for token in token_ids],
            )
        )
    return DatasetExamples(
        dataset_id=dataset.id,
        input_shape=list(text.input_ids.shape[1:]),
        examples=examples,
        tokenizer_model_id=tokenizer_model_id if tokenizer is not None else None,
    )


def dataset_examples(
    store: BlobStore, dataset: Dataset, wanted: list[str], max_rows: int, tokenizer_model: Model | None = None
) -> DatasetExamples:
    """``tokenizer_model``: decode a text dataset with this model's tokenizer (else the one that made it)."""
    if not 1 <= len(wanted) <= MAX_EXAMPLES:
        raise invalid(f"give between 1 and {MAX_EXAMPLES} ids (repeat `ids`), not {len(wanted)}", "query.ids")
    unique = list(dict.fromkeys(wanted))
    if dataset.format == STORED_FORMAT:
        with store.local_path(dataset.blob_sha256) as path:
            text = read_stored(path)
        tokenizer = None if tokenizer_model is None else load_model_tokenizer(store, tokenizer_model)
        if tokenizer_model is not None and tokenizer is None:
            raise invalid(f"model {tokenizer_model.id!r} was uploaded without a tokenizer", "query.model_id")
        return select_text_examples(
            text, dataset, unique, tokenizer, None if tokenizer_model is None else tokenizer_model.id
        )
    if tokenizer_model is not None:
        raise invalid("model_id decodes text datasets; this dataset holds arrays", "query.model_id")
    with store.local_path(dataset.blob_sha256) as path:
        arrays = read_dataset(path, dataset.format, max_rows=max_rows)
    return select_examples(arrays, dataset, unique)
