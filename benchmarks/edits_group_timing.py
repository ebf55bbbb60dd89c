"""One group of removal sets of ``edits_retraining.py`` timed again: its edits against its retrains, repeated.

``edits_retraining.py`` times each set once per seed (the seed's retrain, then its model's edits, under the same
load) and reports a group's mean: on the MLPs an edit takes 30–80 ms, so one hiccup of the host moves a group of
three edits by half. Here each seed's model is trained and fitted as there, the group's sets are drawn as there
(from seed 0's model), and each (seed, set) is timed over ``--repeats`` rounds of one retrain and one default edit
(its curvature scale computed once beforehand, as the service reuses it); medians per (seed, set), and the
group's edit-to-retrain ratio of the summed medians.

    python -m benchmarks.edits_group_timing --arch mlp_narrow --group "random 10"
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.common import RESULTS, digits_split, set_threads
from benchmarks.edits_retraining import EPOCHS, KS, RemovalSet, Setting, removal_sets, train
from worker.attribution import (
    Curvature,
    CurvatureScale,
    EditOptions,
    EditResult,
    Examples,
    InfluenceOptions,
    edit_parameters,
    fit_curvature,
)


def timed(run: Callable[[], object]) -> float:
    began = time.perf_counter()
    run()
    return time.perf_counter() - began


def time_set(
    arch: str,
    setting: Setting,
    train_data: Examples,
    model: nn.Module,
    fit: Curvature,
    options: InfluenceOptions,
    removal: RemovalSet,
    seed: int,
    repeats: int,
) -> tuple[list[float], list[float]]:
    """Seconds of ``repeats`` rounds of (the seed's retrain without the set, the default edit of its model)."""
    keep = torch.ones(len(train_data), dtype=torch.bool)
    keep[removal.rows] = False
    rows = torch.nonzero(keep).reshape(-1)

    def edit(scale: CurvatureScale | None = None) -> EditResult:
        return edit_parameters(
            model,
            train_data,
            removal.rows,
            loss="cross_entropy",
            method="influence",
            options=options,
            fit=fit,
            edit=EditOptions(),
            curvature_scale=scale,
        )

    scale = edit().curvature_scale  # computed once, as the service reuses it across a model's edits
    retrains, edits = [], []
    for _ in range(repeats):
        retrains.append(timed(lambda: train(arch, train_data, rows, seed, setting)))
        edits.append(timed(lambda: edit(scale)))
    return retrains, edits


def group_rows(arch: str, group: str, seeds: int, queries: int, repeats: int) -> list[str]:
    train_data, test = digits_split(num_queries=397)
    setting = Setting(arch, queries=queries, seeds=seeds, epochs=EPOCHS[arch])
    everything = torch.arange(len(train_data))
    options = InfluenceOptions(strategy="ekfac")
    models = [train(arch, train_data, everything, seed, setting) for seed in range(seeds)]
    fits = [fit_curvature(model, train_data, "cross_entropy", options.fit_options()) for model in models]
    query_examples = Examples(test.inputs[:queries], test.targets[:queries])
    sets = [
        s for s in removal_sets(arch, models[0], train_data, query_examples, fits[0], seed=1, ks=KS) if s.group == group
    ]
    if not sets:
        raise SystemExit(f"no removal set named {group!r}")
    lines = [
        "| seed | set | retrain (median) | edit (median) | edit times | edit vs retrain |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    retrain_total, edit_total = 0.0, 0.0
    for seed, (model, fit) in enumerate(zip(models, fits, strict=True)):
        for removal in sets:
            retrains, edits = time_set(arch, setting, train_data, model, fit, options, removal, seed, repeats)
            retrain, edited = statistics.median(retrains), statistics.median(edits)
            retrain_total, edit_total = retrain_total + retrain, edit_total + edited
            where = "" if removal.query is None else f" (query {removal.query})"
            lines.append(
                f"| {seed} | {removal.group}{where} | {retrain:.3f} s | {edited:.3f} s | "
                f"{', '.join(f'{t:.3f}' for t in edits)} | {retrain / edited:.1f}× |"
            )
            print(lines[-1], flush=True)
    lines.append(f"| every seed | {group} | | | | **{retrain_total / edit_total:.1f}×** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(EPOCHS), default="mlp_narrow")
    parser.add_argument(
        "--group", default="random 10", help='a group of edits_retraining.py, e.g. "top-100 self-influence"'
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=2, help="own-query groups: the first queries' sets")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    rows = group_rows(args.arch, args.group, args.seeds, args.queries, args.repeats)
    lines = [
        f"# Edit against retrain, one group timed again ({args.arch}, {args.group})",
        "",
        f"Command: `python -m benchmarks.edits_group_timing {' '.join(sys.argv[1:])}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, {args.threads} threads, "
        f"CPU. Each (seed, set): {args.repeats} rounds of one retrain ({EPOCHS[args.arch]} full-batch Adam epochs) "
        "and one default edit (the curvature scale computed beforehand); medians. Last row: the summed medians' "
        "ratio.",
        "",
        *rows,
    ]
    slug = re.sub(r"[^a-z0-9]+", "_", args.group.lower()).strip("_")
    (RESULTS / f"edits_group_timing_{args.arch}_{slug}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
