"""Which training rows (or meta-learning tasks) an edit's ``remove`` list names.

Ids are matched as strings, so ``7`` and ``"7"`` name the same example; unknown ids are returned, never dropped.
Used by the service (to refuse unknown ids with a 422 before queuing) and by the edit job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def removal_rows(ids: np.ndarray, remove: Sequence[int | str]) -> tuple[list[int], list[int | str]]:
    """(sorted unique row indices, ids that are not in the dataset)."""
    position = {str(value): index for index, value in enumerate(ids.tolist())}
    missing = [value for value in remove if str(value) not in position]
    return sorted({position[str(value)] for value in remove if str(value) in position}), missing


def removal_tasks(tasks: np.ndarray | None, remove: Sequence[int | str]) -> tuple[list[int], list[int | str]]:
    """(sorted unique task ids, entries that name no task of the meta-dataset)."""
    known = set() if tasks is None else {int(t) for t in tasks.tolist()}
    chosen, missing = set(), []
    for value in remove:
        text = str(value)
        if text.lstrip("-").isdigit() and int(text) in known:
            chosen.add(int(text))
        else:
            missing.append(value)
    return sorted(chosen), missing
