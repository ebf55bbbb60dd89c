"""A pass's kept layer activities read back exactly as they were recorded, from memory or from mapped files."""

from __future__ import annotations

import torch

from worker.attribution.hooks import Activities, LayerActivity
from worker.attribution.kept_activities import ActivityKeeper, activity_bytes
from worker.attribution.training_index import FileRows
from worker.attribution.types import Examples


def training_set(rows: int) -> Examples:
    return Examples(inputs=torch.zeros(rows, 3), targets=torch.zeros(rows, dtype=torch.long))


def recorded_batch(rows: int, seed: int) -> Activities:
    """A token layer with padding (rows a, g and a mask), a compact one (gradient matrices only), a rank-one head."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, 5, generator=generator) > 0.3
    token = LayerActivity(
        torch.randn(rows, 5, 4, generator=generator) * mask[..., None],
        torch.randn(rows, 5, 2, generator=generator) * mask[..., None],
        mask,
    )
    compact = LayerActivity.of_gradients(torch.randn(rows, 3, 6, generator=generator, dtype=torch.float64))
    head = LayerActivity(torch.randn(rows, 1, 4, generator=generator), torch.randn(rows, 1, 3, generator=generator))
    return {"token": token, "compact": compact, "head": head}


def record(keeper: ActivityKeeper, sizes: list[int]) -> list[tuple[int, Activities]]:
    recorded, start = [], 0
    for seed, rows in enumerate(sizes):
        batch = recorded_batch(rows, seed)
        keeper.add(start, batch)
        recorded.append((start, batch))
        start += rows
    return recorded


def assert_same(read: list[tuple[int, Activities]], recorded: list[tuple[int, Activities]]) -> None:
    assert [start for start, _ in read] == [start for start, _ in recorded]
    for (_, got), (_, want) in zip(read, recorded, strict=True):
        assert list(got) == list(want)
        for name in want:
            for field in ("activations", "gradients", "mask", "example_gradients"):
                a, b = getattr(got[name], field), getattr(want[name], field)
                assert (a is None) == (b is None), (name, field)
                if a is not None:
                    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), (name, field)


def test_activities_kept_in_memory_and_in_files_read_back_exactly_and_more_than_once() -> None:
    sizes = [4, 4, 3]
    train = training_set(sum(sizes))
    for spill_bytes, spilled in ((10**9, False), (0, True)):
        keeper = ActivityKeeper(train, 4, budget_bytes=10**6, spill_bytes=spill_bytes)
        recorded = record(keeper, sizes)
        kept = keeper.finish()
        assert kept is not None and kept.spilled is spilled and kept.matches(train, 4)
        assert not kept.matches(train, 5) and not kept.matches(training_set(11), 4)
        assert_same(list(kept.batches()), recorded)
        assert_same(list(kept.batches()), recorded)  # the files' pages handed back after a read are read again


def test_the_keeper_gives_up_beyond_its_budget_or_when_a_layer_changes_form() -> None:
    sizes = [4, 4, 3]
    train = training_set(sum(sizes))
    total = sum(activity_bytes(recorded_batch(rows, seed)) for seed, rows in enumerate(sizes))
    for spill_bytes in (10**9, 0):
        exact = ActivityKeeper(train, 4, budget_bytes=total, spill_bytes=spill_bytes)
        record(exact, sizes)
        assert exact.finish() is not None
        short = ActivityKeeper(train, 4, budget_bytes=total - 1, spill_bytes=spill_bytes)
        record(short, sizes)
        assert short.finish() is None
    changed = ActivityKeeper(train, 4, budget_bytes=10**6, spill_bytes=0)
    changed.add(0, recorded_batch(4, 0))
    other = recorded_batch(4, 1)
    other["token"] = LayerActivity(other["token"].activations[:, :3], other["token"].gradients[:, :3])
    changed.add(4, other)
    assert changed.finish() is None
    assert ActivityKeeper(train, 4, budget_bytes=0).finish() is None


def test_no_room_for_the_files_keeps_nothing_and_the_pass_goes_on(monkeypatch) -> None:
    """A full temporary directory: the keeper gives up (the later passes run the model) instead of failing."""

    def no_room(self: FileRows, rows: torch.Tensor) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(FileRows, "append", no_room)
    train = training_set(8)
    keeper = ActivityKeeper(train, 4, budget_bytes=10**6, spill_bytes=0)
    record(keeper, [4, 4])
    assert keeper.finish() is None and keeper.files == {}
