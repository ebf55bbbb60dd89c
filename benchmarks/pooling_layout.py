"""Max-pooling channels-last in the engine's forward-only passes (``worker.attribution.pooling_layout``).

1. The kernel: ``max_pool2d`` (2×2) on contiguous (N, C, H, W) inputs against the same values copied to
   channels-last, pooled, and copied back, at the shapes of the edits benchmark's CNNs (1,300 rows; 16 and 32
   channels of 8×8) and larger images with 64, 4 and 2 channels (below MIN_CHANNELS, 4, the hooks leave the
   layout alone); forward only, median of repeats.
2. An edit: the default ``newton`` edit of the digits CNN (benchmarks/edits_retraining.py's, seed 0) removing its
   top-100 rows by self-influence, with the hooks and with them replaced by nothing, alternating, median of
   repeats; the retrain without those rows beside it (median of three).

    python -m benchmarks.pooling_layout   # writes results/pooling_layout.md
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS, digits_split, set_threads
from benchmarks.edits_retraining import EPOCHS, Setting, removal_sets, train
from worker.attribution import EditOptions, Examples, InfluenceOptions, edit_parameters, fit_curvature
from worker.attribution import proximal as proximal_module
from worker.attribution.pooling_layout import channels_last_max_pooling

SHAPES = ((1300, 16, 8, 8), (1300, 32, 8, 8), (64, 64, 32, 32), (64, 4, 32, 32), (64, 2, 32, 32))


def median_ms(run: Callable[[], object], repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times)


def kernel_rows(repeats: int) -> list[str]:
    lines = [
        "| input (N, C, H, W) | contiguous | channels-last, both copies included | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for shape in SHAPES:
        x = torch.randn(*shape)
        with torch.no_grad():
            plain = median_ms(lambda x=x: F.max_pool2d(x, 2), repeats)
            moved = median_ms(
                lambda x=x: F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous(), repeats
            )
        lines.append(f"| {shape} | {plain:.2f} ms | {moved:.2f} ms | {plain / moved:.1f}× |")
    return lines


def edit_rows(arch: str, repeats: int) -> list[str]:
    train_data, test = digits_split(num_queries=397)
    setting = Setting(arch, queries=2, seeds=1, epochs=EPOCHS[arch])
    model = train(arch, train_data, torch.arange(len(train_data)), 0, setting)
    fit = fit_curvature(model, train_data, "cross_entropy", InfluenceOptions(strategy="ekfac").fit_options())
    queries = Examples(test.inputs[:2], test.targets[:2])
    sets = removal_sets(arch, model, train_data, queries, fit, seed=1, ks=(100,))
    removed = next(s.rows for s in sets if s.group == "top-100 self-influence")
    keep = torch.ones(len(train_data), dtype=torch.bool)
    keep[removed] = False
    rows = torch.nonzero(keep).reshape(-1)
    retrain_times = []
    for _ in range(3):
        began = time.perf_counter()
        train(arch, train_data, rows, 0, setting)
        retrain_times.append(time.perf_counter() - began)
    retrain = statistics.median(retrain_times)
    first = edit_parameters(
        model, train_data, removed, loss="cross_entropy", method="influence", fit=fit, edit=EditOptions()
    )

    def edit() -> dict[str, torch.Tensor]:
        return edit_parameters(
            model,
            train_data,
            removed,
            loss="cross_entropy",
            method="influence",
            fit=fit,
            edit=EditOptions(),
            curvature_scale=first.curvature_scale,
        ).state

    hooked = channels_last_max_pooling
    times: dict[str, list[float]] = {"channels-last pooling": [], "plain": []}
    states = {}
    for _ in range(repeats):  # alternating, so that both see the same load
        for name in times:
            proximal_module.channels_last_max_pooling = (  # type: ignore[assignment]
                hooked if name != "plain" else (lambda layers: contextlib.nullcontext())
            )
            began = time.perf_counter()
            states[name] = edit()
            times[name].append(time.perf_counter() - began)
    proximal_module.channels_last_max_pooling = hooked  # type: ignore[assignment]
    same = all(torch.equal(value, states["plain"][key]) for key, value in states["channels-last pooling"].items())
    lines = [
        f"| {arch}: forward passes | edit (median of {repeats}) | retrain (median of 3) | retrain / edit |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in times.items():
        seconds = statistics.median(values)
        lines.append(f"| {name} | {seconds:.3f} s | {retrain:.2f} s | {retrain / seconds:.1f}× |")
    lines.append("")
    lines.append(f"Edited weights identical with and without: {same}.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    set_threads(args.threads)
    lines = [
        "# Max-pooling channels-last in forward-only passes",
        "",
        f"Command: `python -m benchmarks.pooling_layout --repeats {args.repeats}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, {args.threads} threads, "
        "CPU.",
        "",
        *kernel_rows(args.repeats * 4),
        "",
        *edit_rows("cnn", args.repeats),
        "",
        *edit_rows("cnn_wide", args.repeats),
    ]
    (RESULTS / "pooling_layout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
