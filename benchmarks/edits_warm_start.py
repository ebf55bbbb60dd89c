"""Edits against two kinds of retraining: from scratch, and from the model's own weights (warm start).

``edits_retraining.py`` measures an edit against retraining from scratch with the same seed, as a user who
retrains would. The edit estimates the minimiser of the proximal retrain objective near the model's weights θ₀,
which is what retraining *from θ₀* would approach; a retrain from scratch also carries the effect of the removal
on the whole optimisation path. Where a query's loss barely moves when its helpful rows go (changes of 1e-4 nats
and less on the CNN), the two kinds of retraining can disagree in sign. This benchmark puts them side by side on
the own-query sets of edits_retraining.py (each query's top-k helpful rows by EK-FAC, from seed 0's model; every
seed's model edited and retrained without them):

- scratch: the seed's retrain without the set minus its full model (as in edits_retraining.py);
- warm E: the seed's full model trained E more epochs without the set (full-batch Adam, the training's learning
  rate, a fresh optimiser state) minus the same model trained E more epochs on every row (so that what the
  continued training does by itself cancels);
- the default edit's change.

For each size: the seed-mean sign agreement and Pearson of the edit against each kind of retraining, and of the
two kinds against each other; then each query on which the edit and the scratch retrain disagree.

    python -m benchmarks.edits_warm_start --arch cnn --seeds 3 --queries 12   # results/edits_warm_start_cnn.md
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS, digits_split, set_threads
from benchmarks.edits_retraining import EPOCHS, Setting, load, losses, removal_sets, train, train_epochs
from worker.attribution import EditOptions, Examples, InfluenceOptions, edit_parameters, fit_curvature


def continued(model: nn.Module, data: Examples, rows: torch.Tensor, epochs: int, setting: Setting) -> nn.Module:
    """A copy of ``model`` trained ``epochs`` more full-batch Adam epochs on ``rows`` (as it was trained)."""
    return train_epochs(copy.deepcopy(model), data, rows, setting, epochs)


def agreement(a: np.ndarray, b: np.ndarray) -> str:
    agreeing = int((np.sign(a) == np.sign(b)).sum())
    pearson = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return f"{100 * agreeing / len(a):.0f}% ({agreeing}/{len(a)}), {pearson:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="cnn", choices=sorted(EPOCHS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--queries", type=int, default=12)
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--epochs", type=int, nargs="+", default=[50, 150], help="warm-start epochs")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    set_threads(args.threads)
    setting = Setting(args.arch, queries=args.queries, seeds=args.seeds, epochs=EPOCHS[args.arch])
    train_data, test = digits_split(num_queries=397)
    queries = Examples(test.inputs[: args.queries], test.targets[: args.queries])
    everything = torch.arange(len(train_data))
    full = [train(args.arch, train_data, everything, s, setting) for s in range(args.seeds)]
    fits = [
        fit_curvature(m, train_data, "cross_entropy", InfluenceOptions(strategy="ekfac").fit_options()) for m in full
    ]
    full_losses = [losses(m, queries) for m in full]
    controls = {  # each seed's model trained on with every row: what continuing does by itself
        (s, e): losses(continued(m, train_data, everything, e, setting), queries)
        for s, m in enumerate(full)
        for e in args.epochs
    }
    ranked = removal_sets(args.arch, full[0], train_data, queries, fits[0], 1, tuple(args.ks))
    sets = [removal for removal in ranked if removal.query is not None]
    kinds = ["scratch", *[f"warm {e}" for e in args.epochs], "edit"]
    changes: dict[str, dict[int, np.ndarray]] = {
        kind: {k: np.zeros((args.seeds, args.queries)) for k in args.ks} for kind in kinds
    }
    for index, removal in enumerate(sets):
        assert removal.query is not None
        k, q = len(removal.rows), removal.query
        keep = torch.ones(len(train_data), dtype=torch.bool)
        keep[removal.rows] = False
        rows = torch.nonzero(keep).reshape(-1)
        for s, model in enumerate(full):
            scratch = train(args.arch, train_data, rows, s, setting)
            changes["scratch"][k][s, q] = float(losses(scratch, queries)[q] - full_losses[s][q])
            for e in args.epochs:
                warm = continued(model, train_data, rows, e, setting)
                changes[f"warm {e}"][k][s, q] = float(losses(warm, queries)[q] - controls[(s, e)][q])
            state = edit_parameters(
                model,
                train_data,
                removal.rows,
                loss="cross_entropy",
                method="influence",
                fit=fits[s],
                edit=EditOptions(),
            ).state
            changes["edit"][k][s, q] = float(losses(load(args.arch, state), queries)[q] - full_losses[s][q])
        print(f"  set {index + 1}/{len(sets)} top-{k} query {q} done", flush=True)
    lines = [
        f"# Edits against retraining from scratch and from the model's own weights ({args.arch})",
        "",
        f"Command: `python -m benchmarks.edits_warm_start --arch {args.arch} --seeds {args.seeds} --queries "
        f"{args.queries} --ks {' '.join(map(str, args.ks))} --epochs {' '.join(map(str, args.epochs))}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, {args.threads} threads, CPU.",
        "",
        "Own-query sets (each query's top-k helpful rows by EK-FAC on seed 0's model); each value a mean over the "
        f"{args.seeds} seeds' models of the change of that query's own loss (float64). Warm E: the seed's model "
        "trained E more full-batch Adam epochs without the set, minus the same with every row. Sign agreement and "
        "Pearson over the queries.",
        "",
        "| set | edit vs scratch | edit vs "
        + " | edit vs ".join(f"warm {e}" for e in args.epochs)
        + " | scratch vs "
        + " | scratch vs ".join(f"warm {e}" for e in args.epochs)
        + " |",
        "| --- | --- | "
        + " | ".join("---" for _ in args.epochs)
        + " | "
        + " | ".join("---" for _ in args.epochs)
        + " |",
    ]
    means = {kind: {k: values.mean(0) for k, values in by_k.items()} for kind, by_k in changes.items()}
    for k in args.ks:
        cells = [agreement(means["edit"][k], means["scratch"][k])]
        cells += [agreement(means["edit"][k], means[f"warm {e}"][k]) for e in args.epochs]
        cells += [agreement(means["scratch"][k], means[f"warm {e}"][k]) for e in args.epochs]
        lines.append(f"| top-{k} helpful (own query) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Queries on which the edit's seed-mean change and the scratch retrain's disagree in sign (each kind's mean "
        "over seeds, and in brackets how many seeds' values are negative):",
        "",
        "| set | query (class) | full loss | scratch | " + " | ".join(f"warm {e}" for e in args.epochs) + " | edit |",
        "| --- | --- | --- | --- | " + " | ".join("---" for _ in args.epochs) + " | --- |",
    ]
    full_mean = torch.stack(full_losses).mean(0)
    for k in args.ks:
        for q in range(args.queries):
            if np.sign(means["edit"][k][q]) == np.sign(means["scratch"][k][q]):
                continue
            cells = [
                f"{means[kind][k][q]:+.2e} ({int((changes[kind][k][:, q] < 0).sum())}/{args.seeds})" for kind in kinds
            ]
            lines.append(
                f"| top-{k} helpful | {q} ({int(queries.targets[q])}) | {float(full_mean[q]):.2e} | "
                + " | ".join(cells)
                + " |"
            )
    (RESULTS / f"edits_warm_start_{args.arch}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
