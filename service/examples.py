"""Some examples of a stored dataset, picked by the caller's ids (for the results page and the SDK)."""

from __future__ import annotations

import numpy as np

from service.db.tables import Dataset
from service.problems import ProblemError, invalid
from service.schemas.datasets import DatasetExample, DatasetExamples
from service.storage import BlobStore
from worker.artifacts.datasets import DatasetArrays, read_dataset

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


def select_examples(arrays: DatasetArrays, dataset: Dataset, wanted: list[str]) -> DatasetExamples:
    positions = positions_of(arrays.ids, wanted, dataset.id)
    per_example = int(np.prod(arrays.inputs.shape[1:], dtype=np.int64))
    if per_example * len(positions) > MAX_VALUES:
        raise invalid(
            f"{len(positions)} examples of {per_example} values each are over the limit of {MAX_VALUES} "
            f"values per request; ask for fewer ids",
            "query.ids",
        )
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


def dataset_examples(store: BlobStore, dataset: Dataset, wanted: list[str], max_rows: int) -> DatasetExamples:
    if not 1 <= len(wanted) <= MAX_EXAMPLES:
        raise invalid(f"give between 1 and {MAX_EXAMPLES} ids (repeat `ids`), not {len(wanted)}", "query.ids")
    with store.local_path(dataset.blob_sha256) as path:
        arrays = read_dataset(path, dataset.format, max_rows=max_rows)
    return select_examples(arrays, dataset, list(dict.fromkeys(wanted)))
