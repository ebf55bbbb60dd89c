"""Edits against retraining on digits: does an edited model behave like the model retrained without the examples?

For an MLP 64→128→128→10 and a small CNN on scikit-learn's 8×8 digits (1,400 training images, 397 test images):
1. train the model with each seed and fit EK-FAC on each; attribute with seed 0's (pairwise on Q test queries,
   and self-influence);
2. removal sets: the top-k helpful training examples of each single query (k = 10, 40, 100), the top-k by
   self-influence, and random sets of k;
3. for each set and each seed s, retrain without the set from scratch (the same recipe, seed s) and edit the
   seed-s full model with each estimator (``first_order`` with the attribution's scoring damping, ``newton`` at
   several proximity fractions): each edit has the retrain it estimates, the one from the same weights' seed
   (as the service does, a model's first edit computes the default λ's curvature scale and its later edits
   reuse it; ``--fresh-scale``: every edit computes it);
4. report the Pearson correlation and the sign agreement of the query-loss changes (the mean over seeds of the
   edited changes against the mean over seeds of the retrained ones, each against its own seed's full model; for
   a query's own top-k set its own loss, for self-influence and random sets every query's loss; the sign also
   over the values whose retrained seed mean is resolved, SIGN_RESOLUTION standard errors from zero), the test
   accuracy of the edited models against the retrained ones (means over seeds, and each seed against its own),
   and edit time against retrain time;
5. then each own-query set's own query one by one (``query_table``): the retrained change with its standard error
   and each estimator's same-seed sign agreement (the seeds whose edit moves the loss the way their own retrain
   does). Query losses are evaluated in float64 (``losses``).

    python -m benchmarks.edits_retraining            # full size, writes results/edits_retraining.md
    python -m benchmarks.edits_retraining --quick    # a smaller run, results/edits_retraining_quick.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, digits_split, set_threads
from worker.attribution import (
    CurvatureScale,
    EditOptions,
    Examples,
    InfluenceOptions,
    attribute,
    edit_parameters,
    fit_curvature,
)
from worker.attribution.editing import LEARNED_SHARE_WARNING
from worker.attribution.hooks import TrackedLayer, resolve_layers
from worker.attribution.losses import constant_prediction_loss
from worker.attribution.options import DEFAULT_PROXIMITY_FRACTION
from worker.attribution.proximal import ProximalObjective

KS = (10, 40, 100)
EPOCHS = {"mlp": 300, "cnn": 150, "mlp_narrow": 300, "cnn_wide": 150}  # full-batch Adam epochs of each model
SIGN_RESOLUTION = 2.0  # a retrained change's sign is resolved beyond this many standard errors of its seed mean


@dataclass
class Setting:
    name: str
    queries: int
    seeds: int
    epochs: int
    lr: float = 0.01
    weight_decay: float = 1e-3


def build(arch: str, seed: int) -> nn.Module:
    """mlp 64→128→128→10 and cnn (conv 8, conv 16, max-pool, linear): the two measured models; mlp_narrow
    64→32→32→10 and cnn_wide (conv 16, conv 32): held out, to check a rule chosen on the first two."""
    torch.manual_seed(seed)
    if arch in ("mlp", "mlp_narrow"):
        width = 128 if arch == "mlp" else 32
        return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
    channels = (8, 16) if arch == "cnn" else (16, 32)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, channels[0], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels[0], channels[1], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(channels[1] * 16, 10),
    )


def train(arch: str, data: Examples, rows: torch.Tensor, seed: int, setting: Setting) -> nn.Module:
    """Full-batch Adam on the mean cross-entropy + (weight_decay/2)‖θ‖² (the seed picks the initialisation)."""
    return train_epochs(build(arch, seed), data, rows, setting, setting.epochs)


def train_epochs(model: nn.Module, data: Examples, rows: torch.Tensor, setting: Setting, epochs: int) -> nn.Module:
    """``model`` trained in place for ``epochs`` full-batch Adam epochs (a fresh optimiser) on ``rows``: the mean
    cross-entropy + (weight_decay/2)‖θ‖²; returned in eval mode."""
    model.train()
    x, y = data.inputs[rows], data.targets[rows]
    optimizer = torch.optim.Adam(model.parameters(), lr=setting.lr)
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) + 0.5 * setting.weight_decay * sum(
            p.pow(2).sum() for p in model.parameters()
        )
        loss.backward()
        optimizer.step()
    return model.eval()


def losses(model: nn.Module, data: Examples) -> torch.Tensor:
    """Per-example cross-entropy of the model's (float32) weights, evaluated in float64: a confident query's loss
    (1e-7 nats and less on the CNN) is below float32's resolution of 1 − p, and so are the signs of its changes."""
    with torch.no_grad():
        wide = copy.deepcopy(model).double()
        return F.cross_entropy(wide(data.inputs.double()), data.targets, reduction="none")


def accuracy(model: nn.Module, data: Examples) -> float:
    with torch.no_grad():
        return float((model(data.inputs).argmax(1) == data.targets).double().mean())


def load(arch: str, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build(arch, 0)
    model.load_state_dict(state)
    return model.eval()


@dataclass
class RemovalSet:
    group: str  # "top-10 helpful", "self top-40", "random 100", ...
    rows: torch.Tensor
    query: int | None  # the query whose own top-k this is (None: every query is measured)


@dataclass
class Outcome:
    retrained_change: np.ndarray  # (Q,) mean over seeds
    seed_changes: np.ndarray  # (seeds, Q): each seed's retrained − full retrain (the ground truth's own noise)
    retrained_accuracies: list[float]  # per seed (seed 0 first)
    retrain_seconds: float  # mean over this set's retrains, timed between its edits (the same load)
    edited_changes: dict[str, np.ndarray] = field(default_factory=dict)  # (seeds, Q): seed s's model, edited
    edited_accuracies: dict[str, list[float]] = field(default_factory=dict)  # per seed
    edit_seconds: dict[str, float] = field(default_factory=dict)  # mean over the seeds' edits
    # per seed, the remaining rows' mean training loss (before, after): each retrain against its own seed's full
    # model, each edit as its diagnostics report it; and their best constant prediction's (``loss_table``)
    retrained_losses: list[tuple[float, float]] = field(default_factory=list)
    edited_losses: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    constant_loss: float = float("nan")
    warnings: dict[str, int] = field(default_factory=dict)  # edits (of any seed) that warned

    @property
    def retrained_accuracy(self) -> float:
        return float(np.mean(self.retrained_accuracies))

    def edited_change(self, name: str) -> np.ndarray:
        """(Q,): the mean over seeds of the edited models' query-loss changes."""
        return self.edited_changes[name].mean(0)

    def edited_accuracy(self, name: str) -> float:
        return float(np.mean(self.edited_accuracies[name]))

    def same_seed_gaps(self, name: str) -> np.ndarray:
        """(seeds,): each seed's edited test accuracy minus its own retrain's."""
        return np.array(self.edited_accuracies[name]) - np.array(self.retrained_accuracies)


def reference_eigenvalue(model: nn.Module, layers: list[TrackedLayer], data: Examples) -> float:
    """The mean Gauss-Newton eigenvalue that the default edit's λ is (the unit of ``--fractions``): trace(G)/D
    over every training row, computed as an edit computes it when it stores no rows of G."""
    nothing = torch.zeros(0, dtype=torch.long)
    objective = ProximalObjective(model, layers, data, nothing, "cross_entropy", 1024, linearised=False)
    computed = objective.mean_eigenvalue()
    assert computed is not None
    return computed[0]


def removal_sets(
    arch: str, model: nn.Module, train_data: Examples, queries: Examples, fit, seed: int, ks: tuple[int, ...] = KS
) -> list[RemovalSet]:
    options = InfluenceOptions(strategy="ekfac")
    pairwise = attribute(
        model,
        train_data,
        queries,
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=max(ks),
        options=options,
        fits=[fit],
    )
    own = attribute(
        model, train_data, None, loss="cross_entropy", method="influence", mode="self", options=options, fits=[fit]
    )
    assert pairwise.topk is not None and own.scores is not None
    generator = torch.Generator().manual_seed(seed)
    sets = []
    for k in ks:
        for q in range(len(queries)):
            sets.append(RemovalSet(f"top-{k} helpful (own query)", pairwise.topk.positive_indices[q, :k].clone(), q))
    for k in ks:
        sets.append(RemovalSet(f"top-{k} self-influence", torch.topk(own.scores, k).indices, None))
        sets.append(RemovalSet(f"random {k}", torch.randperm(len(train_data), generator=generator)[:k], None))
    return sets


def estimators(
    fractions: list[float], mean_eigenvalue: float, cg_max_iter: int | None, cg_tol: float, variants: list[str]
) -> dict[str, EditOptions]:
    """first_order, and newton at each proximity fraction of the mean eigenvalue; DEFAULT_PROXIMITY_FRACTION
    stands for the default λ (proximity None: the L2 penalty the model's gradient shows where it shows one, else
    that fraction, so the edit's time includes estimating the mean eigenvalue)."""
    chosen = {"first_order": EditOptions(estimator="first_order")}
    for fraction in fractions:
        default = fraction == DEFAULT_PROXIMITY_FRACTION
        name = "newton default λ" if default else f"newton λ={fraction:g}·mean"
        chosen[name] = EditOptions(
            estimator="newton",
            proximity=None if default else fraction * mean_eigenvalue,
            cg_max_iter=cg_max_iter,
            cg_tol=cg_tol,
        )
    for variant in variants:  # "cg_max_iter=12,batch_size=512": the default newton with these options changed
        changes = {key: _option_value(value) for key, value in (p.split("=") for p in variant.split(","))}
        if "fraction" in changes:  # "fraction=0.5": proximity as a multiple of the mean eigenvalue
            changes["proximity"] = float(changes.pop("fraction")) * mean_eigenvalue
        options = replace(EditOptions(estimator="newton", cg_max_iter=cg_max_iter, cg_tol=cg_tol), **changes)
        rest = ",".join(part for part in variant.split(",") if not part.startswith("estimator="))
        chosen[f"{options.estimator} {rest}".strip()] = options
    return chosen


def _option_value(text: str) -> int | float | str:
    """A variant's option value: an int, a float (with "." or an exponent) or a word (curvature_products)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def run_setting(
    arch: str,
    setting: Setting,
    fractions: list[float],
    cg_max_iter: int | None,
    cg_tol: float,
    variants: list[str],
    ks: tuple[int, ...] = KS,
    reuse_scale: bool = True,
) -> tuple[list[str], dict[str, float]]:
    train_data, test = digits_split(num_queries=397)
    queries = Examples(test.inputs[: setting.queries], test.targets[: setting.queries])
    everything = torch.arange(len(train_data))
    started = time.perf_counter()
    full = [train(arch, train_data, everything, s, setting) for s in range(setting.seeds)]
    fits = [
        fit_curvature(m, train_data, "cross_entropy", InfluenceOptions(strategy="ekfac").fit_options()) for m in full
    ]
    # the proximity fractions' unit is each model's own mean eigenvalue; the estimators' names are the same
    chosen_by_seed = [
        estimators(
            fractions, reference_eigenvalue(m, resolve_layers(m, None), train_data), cg_max_iter, cg_tol, variants
        )
        for m in full
    ]
    chosen = chosen_by_seed[0]
    sets = removal_sets(arch, full[0], train_data, queries, fits[0], seed=1, ks=ks)
    full_losses = [losses(m, queries) for m in full]
    # as the service runs edits: the first edit of a model computes the default λ's curvature scale, later edits
    # of the same model reuse it (kept per estimator, so that each pays for it once)
    scales: dict[tuple[int, str], CurvatureScale] = {}
    lambdas: dict[int, str] = {}  # each seed's default λ and its rule (as its first default edit reported them)
    steps_taken: dict[str, Counter[int]] = {}  # newton estimators: edits by the Gauss-Newton steps they took
    outcomes = []
    for index, removal in enumerate(sets):
        keep = torch.ones(len(train_data), dtype=torch.bool)
        keep[removal.rows] = False
        rows = torch.nonzero(keep).reshape(-1)
        edits: dict[str, list[tuple[dict[str, torch.Tensor], float, int]]] = {name: [] for name in chosen}
        remaining_losses: dict[str, list[tuple[float, float]]] = {name: [] for name in chosen}
        retrained, retrain_times = [], []
        kept = train_data.subset(rows)
        # each seed's retrain, then the edits of the same seed's model: both timed under the same load
        for seed in range(setting.seeds):
            began = time.perf_counter()
            retrained.append(train(arch, train_data, rows, seed, setting))
            retrain_times.append(time.perf_counter() - began)
            for name, options in chosen_by_seed[seed].items():
                began = time.perf_counter()
                result = edit_parameters(
                    full[seed],
                    train_data,
                    removal.rows,
                    loss="cross_entropy",
                    method="influence",
                    options=InfluenceOptions(strategy="ekfac"),
                    fit=fits[seed],
                    edit=options,
                    curvature_scale=scales.get((seed, name)),
                )
                edits[name].append((result.state, time.perf_counter() - began, len(result.diagnostics["warnings"])))
                remaining_losses[name].append(
                    (result.diagnostics["remaining_loss_before"], result.diagnostics["remaining_loss_after"])
                )
                if options.estimator == "newton":
                    steps_taken.setdefault(name, Counter())[result.diagnostics["solver"]["steps"]] += 1
                if name == "newton default λ" and seed not in lambdas:
                    lambdas[seed] = f"{result.diagnostics['proximity']:.3g} ({result.diagnostics['proximity_rule']})"
                if reuse_scale and result.curvature_scale is not None:
                    scales[(seed, name)] = result.curvature_scale
        per_seed = torch.stack([losses(m, queries) - full_losses[s] for s, m in enumerate(retrained)])
        constant = constant_prediction_loss(kept.targets, None, "cross_entropy")
        assert constant is not None  # rows remain and their weights are 1
        outcome = Outcome(
            per_seed.mean(0).numpy(),
            per_seed.numpy(),
            [accuracy(m, test) for m in retrained],
            float(np.mean(retrain_times)),
            retrained_losses=[
                (float(losses(full[s], kept).mean()), float(losses(m, kept).mean())) for s, m in enumerate(retrained)
            ],
            edited_losses=remaining_losses,
            constant_loss=constant,
        )
        for name, by_seed in edits.items():
            edited = [load(arch, state) for state, _, _ in by_seed]
            outcome.edited_changes[name] = torch.stack(
                [losses(m, queries) - full_losses[s] for s, m in enumerate(edited)]
            ).numpy()
            outcome.edited_accuracies[name] = [accuracy(m, test) for m in edited]
            outcome.edit_seconds[name] = float(np.mean([seconds for _, seconds, _ in by_seed]))
            outcome.warnings[name] = sum(warned > 0 for _, _, warned in by_seed)
        outcomes.append(outcome)
        print(
            f"  {arch} set {index + 1}/{len(sets)} {removal.group} done ({time.perf_counter() - started:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        # per set: the retrained accuracies and own-query changes by seed, each estimator's (for the tables' cells)
        query = removal.query
        print(
            f"    query {query}; retrained acc {[round(a, 4) for a in outcome.retrained_accuracies]}"
            + (
                ""
                if query is None
                else f", Δ own loss by seed {[round(float(v), 4) for v in outcome.seed_changes[:, query]]}"
            )
            + "".join(
                f"; {name}: acc {[round(a, 4) for a in outcome.edited_accuracies[name]]}"
                + (
                    ""
                    if query is None
                    else f", Δ {[round(float(v), 4) for v in outcome.edited_changes[name][:, query]]}"
                )
                for name in chosen
            ),
            file=sys.stderr,
            flush=True,
        )
    lines = table(arch, setting, sets, outcomes, chosen, [accuracy(m, test) for m in full])
    lines += query_table(sets, outcomes, chosen, torch.stack(full_losses).mean(0).numpy(), queries.targets)
    if steps_taken:
        lines[3:3] = [
            "",
            "Gauss-Newton steps per edit: "
            + "; ".join(_step_counts(name, counts) for name, counts in steps_taken.items())
            + ".",
        ]
    if lambdas:
        lines[3:3] = ["", "The default edit's λ by seed: " + "; ".join(lambdas[s] for s in sorted(lambdas)) + "."]
    return lines, {}


def _step_counts(name: str, counts: Counter[int]) -> str:
    """An estimator's edits by the Gauss-Newton steps they took ("newton default λ: 1 step on 40, 2 steps on 32 of
    72 edits")."""
    parts = [f"{steps} step{'s' if steps > 1 else ''} on {count}" for steps, count in sorted(counts.items())]
    return f"{name}: {', '.join(parts)} of {sum(counts.values())} edits"


def group_values(members: list[tuple[RemovalSet, Outcome]], values: list[np.ndarray]) -> np.ndarray:
    """The measured values of a group: a query's own entry for own-query sets, every query's otherwise."""
    picked: list[float] = []
    for (removal, _), row in zip(members, values, strict=True):
        picked.extend([float(row[removal.query])] if removal.query is not None else [float(v) for v in row])
    return np.array(picked)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")


def truth_ceiling(members: list[tuple[RemovalSet, Outcome]]) -> tuple[float, float, float]:
    """How well the ground truth agrees with itself: the mean over seed pairs of the Pearson and the sign
    agreement between two seeds' query-loss changes, and the highest Pearson any estimate can expect against the
    mean of K seeds, sqrt(K r / (1 + (K − 1) r)) (Spearman-Brown: the seed noise left in the mean)."""
    seeds = members[0][1].seed_changes.shape[0]
    if seeds < 2:
        return float("nan"), float("nan"), float("nan")
    per_seed = [group_values(members, [o.seed_changes[s] for _, o in members]) for s in range(seeds)]
    pairs = [(s, t) for s in range(seeds) for t in range(s + 1, seeds)]
    r = float(np.mean([pearson(per_seed[s], per_seed[t]) for s, t in pairs]))
    sign = float(np.mean([np.mean(np.sign(per_seed[s]) == np.sign(per_seed[t])) for s, t in pairs]))
    ceiling = float(np.sqrt(seeds * r / (1 + (seeds - 1) * r))) if r > 0 else float("nan")
    return r, sign, ceiling


def resolved_signs(members: list[tuple[RemovalSet, Outcome]]) -> np.ndarray:
    """For each measured value of a group (``group_values``' order): whether the retrained change's sign is
    resolved, its mean over seeds further from zero than SIGN_RESOLUTION standard errors of that mean (the seeds'
    sample spread / √K). Where it is not, retraining with another seed may as well flip it, and a sign
    "agreement" there scores the seed noise. All False with fewer than two seeds."""
    seeds = members[0][1].seed_changes.shape[0]
    per_seed = np.stack([group_values(members, [o.seed_changes[s] for _, o in members]) for s in range(seeds)])
    if seeds < 2:
        return np.zeros(per_seed.shape[1], dtype=bool)
    error = per_seed.std(0, ddof=1) / np.sqrt(seeds)
    return np.abs(per_seed.mean(0)) > SIGN_RESOLUTION * error


def accuracy_ceiling(members: list[tuple[RemovalSet, Outcome]]) -> tuple[float, float]:
    """How close retraining comes to itself in test accuracy: for each set and seed s, acc_s − the mean of the
    other seeds' accuracies; (mean of |·|, worst |·|) over the sets and seeds. A retrain that lands this far from
    the others is still a retrain: an edit within this band is as close as the ground truth lets one judge."""
    gaps = [
        accuracies[s] - float(np.mean(accuracies[:s] + accuracies[s + 1 :]))
        for _, outcome in members
        for accuracies in [outcome.retrained_accuracies]
        for s in range(len(accuracies))
        if len(accuracies) > 1
    ]
    if not gaps:
        return float("nan"), float("nan")
    return float(np.mean(np.abs(gaps))), float(np.max(np.abs(gaps)))


def table(
    arch: str,
    setting: Setting,
    sets: list[RemovalSet],
    outcomes: list[Outcome],
    chosen: dict[str, EditOptions],
    full_accuracy: list[float],
) -> list[str]:
    groups = list(dict.fromkeys(s.group for s in sets))
    retrain_seconds = float(np.mean([o.retrain_seconds for o in outcomes]))
    lines = [
        f"### {arch.upper()} ({setting.queries} queries, {setting.seeds} retraining seeds, {setting.epochs} "
        f"full-batch Adam epochs, L2 {setting.weight_decay})",
        "",
        f"Full retrain: test accuracy {np.mean(full_accuracy):.4f} (seeds {', '.join(f'{a:.3f}' for a in full_accuracy)}); "
        f"a retrain without a set took {retrain_seconds:.2f} s on average (timed between the edits of the same set).",
        "",
        "| removal set | estimator | Pearson | sign agree | sign agree where retraining resolves it | "
        "seed 0's edit alone: Pearson, sign | "
        "acc. edited − retrained, means over seeds (mean / worst) | retrain seed std of acc. | "
        "acc. edited − retrained, same seed (mean / worst) | retrained Δloss range | edited Δloss range | "
        "edit time (× cheaper than a retrain) | edits with warnings |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ceilings = [
        "",
        "Ground truth against itself (the retrained query-loss changes of one seed against another's, the same "
        "removal sets and queries; mean over seed pairs): the Pearson an edit can reach is bounded by the seed noise "
        "left in the mean of the seeds (Spearman-Brown ceiling). Accuracy: each seed's retrained test accuracy "
        "against the mean of the other seeds' (mean / worst absolute gap over the sets and seeds).",
        "",
        "| removal set | seed vs seed Pearson | seed vs seed sign agree | ceiling of Pearson against the seed mean | "
        "retrain acc. − the other seeds' mean (mean abs / worst abs) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for group in groups:
        members = [(s, o) for s, o in zip(sets, outcomes, strict=True) if s.group == group]
        resolved = resolved_signs(members)
        spread = (
            float(np.mean([np.std(o.retrained_accuracies, ddof=1) for _, o in members])) if setting.seeds > 1 else 0.0
        )
        for name in chosen:
            truth_a = group_values(members, [o.retrained_change for _, o in members])
            predicted_a = group_values(members, [o.edited_change(name) for _, o in members])
            correlation = pearson(truth_a, predicted_a)
            sign = float(np.mean(np.sign(truth_a) == np.sign(predicted_a)))
            agreeing = int(np.sum((np.sign(truth_a) == np.sign(predicted_a))[resolved]))
            resolved_cell = (
                f"{100 * agreeing / resolved.sum():.0f}% ({agreeing}/{resolved.sum()})" if resolved.any() else "none"
            )
            seed0_a = group_values(members, [o.edited_changes[name][0] for _, o in members])
            seed0_sign = float(np.mean(np.sign(truth_a) == np.sign(seed0_a)))
            gaps = np.array([o.edited_accuracy(name) - o.retrained_accuracy for _, o in members])
            same_seed = np.concatenate([o.same_seed_gaps(name) for _, o in members])
            seconds = float(np.mean([o.edit_seconds[name] for _, o in members]))
            cheaper = float(
                np.sum([o.retrain_seconds for _, o in members]) / np.sum([o.edit_seconds[name] for _, o in members])
            )
            warned = sum(o.warnings[name] for _, o in members)
            lines.append(
                f"| {group} | {name} | {correlation:.2f} | {100 * sign:.0f}% | {resolved_cell} | "
                f"{pearson(truth_a, seed0_a):.2f}, "
                f"{100 * seed0_sign:.0f}% | {100 * gaps.mean():+.2f} / {100 * gaps[np.abs(gaps).argmax()]:+.2f} pt | "
                f"{100 * spread:.2f} pt | {100 * same_seed.mean():+.2f} / "
                f"{100 * same_seed[np.abs(same_seed).argmax()]:+.2f} pt | [{truth_a.min():.3f}, {truth_a.max():.3f}] | "
                f"[{predicted_a.min():.3f}, {predicted_a.max():.3f}] | {seconds:.3f} s ({cheaper:.1f}×) | "
                f"{warned}/{len(members) * setting.seeds} |"
            )
        r, sign_agree, ceiling = truth_ceiling(members)
        typical, worst_gap = accuracy_ceiling(members)
        ceilings.append(
            f"| {group} | {r:.2f} | {100 * sign_agree:.0f}% | {ceiling:.2f} | "
            f"{100 * typical:.2f} / {100 * worst_gap:.2f} pt |"
        )
    for name in chosen:  # every set: the summed retrain time (per retrain) over the summed edit time
        cheaper = sum(o.retrain_seconds for o in outcomes) / sum(o.edit_seconds[name] for o in outcomes)
        worst = max(abs(o.edited_accuracy(name) - o.retrained_accuracy) for o in outcomes)
        worst_same_seed = max(float(np.abs(o.same_seed_gaps(name)).max()) for o in outcomes)
        lines.append(
            f"| every set ({len(outcomes)}) | {name} | | | | | worst abs {100 * worst:.2f} pt | | "
            f"worst abs {100 * worst_same_seed:.2f} pt | | | "
            f"{np.mean([o.edit_seconds[name] for o in outcomes]):.3f} s ({cheaper:.1f}×) | |"
        )
    typical, worst_gap = accuracy_ceiling(list(zip(sets, outcomes, strict=True)))
    ceilings.append(f"| every set ({len(outcomes)}) | | | | {100 * typical:.2f} / {100 * worst_gap:.2f} pt |")
    lines += [*ceilings, "", *loss_table(outcomes, chosen), ""]
    return lines


def query_table(
    sets: list[RemovalSet],
    outcomes: list[Outcome],
    chosen: dict[str, EditOptions],
    full_loss: np.ndarray,
    classes: torch.Tensor,
) -> list[str]:
    """Each own-query set's own query, one by one: its loss in the full models, the retrained change (seed mean ±
    standard error, how many seeds lower the loss, seed 0's alone) and each estimator's mean edited change with
    its same-seed sign agreement (seeds whose edit moves the loss the way that seed's own retrain does); per set
    size, the same-seed sign agreement over every query and seed. The seed-mean sign of the main table asks
    whether the edits agree with retraining on average over models; the same-seed sign asks, model by model,
    whether an edit moves a query the way retraining that very model does."""
    own = [(s, o) for s, o in zip(sets, outcomes, strict=True) if s.query is not None]
    if not own:
        return []
    names = list(chosen)
    lines = [
        "Own-query sets, query by query: the query's loss in the full models (mean over seeds), the retrained "
        "change of its own loss (mean over seeds ± its standard error; the seeds whose retrain lowers it; seed "
        "0's alone), and each estimator's mean edited change with its same-seed sign agreement (the seeds whose "
        "edited model moves the loss the way its own retrain does). Last row of each size: the same-seed sign "
        "over every query and seed.",
        "",
        "| removal set | query (class) | full loss | retrained Δ: mean ± s.e. | retrains lowering it | seed 0's "
        "retrain | " + " | ".join(f"{name}: mean Δ, same-seed sign" for name in names) + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for group in dict.fromkeys(s.group for s, _ in own):
        members = [(s, o) for s, o in own if s.group == group]
        agreeing = dict.fromkeys(names, 0)
        pairs = 0
        for removal, outcome in members:
            q = removal.query
            assert q is not None
            truth = outcome.seed_changes[:, q]
            seeds = len(truth)
            error = truth.std(ddof=1) / np.sqrt(seeds) if seeds > 1 else float("nan")
            cells = []
            for name in names:
                edited = outcome.edited_changes[name][:, q]
                agree = int(np.sum(np.sign(edited) == np.sign(truth)))
                agreeing[name] += agree
                cells.append(f"{edited.mean():+.2e}, {agree}/{seeds}")
            pairs += seeds
            lines.append(
                f"| {group} | {q} ({int(classes[q])}) | {full_loss[q]:.2e} | {truth.mean():+.2e} ± {error:.1e} | "
                f"{int(np.sum(truth < 0))}/{seeds} | {truth[0]:+.2e} | " + " | ".join(cells) + " |"
            )
        lines.append(
            f"| {group}: every query and seed | | | | | | "
            + " | ".join(f"{100 * agreeing[name] / pairs:.0f}% ({agreeing[name]}/{pairs})" for name in names)
            + " |"
        )
    return ["", *lines, ""]


def given_back(before: float, after: float, constant: float) -> float:
    """The share of what a model had learned about the remaining rows (their loss below the best constant
    prediction's) that ``after`` gives back: the edit's ``learned_given_back``, for a retrain too."""
    return (after - before) / (constant - before)


def loss_table(outcomes: list[Outcome], chosen: dict[str, EditOptions]) -> list[str]:
    """The remaining rows' mean training loss over every set and seed, the retrains' (each against its own seed's
    full model) beside each estimator's: after / before, and the share of what the model had learned about those
    rows that it gave back (the edit's warning is above LEARNED_SHARE_WARNING of it)."""
    rows = [("retrained", [(b, a, o.constant_loss, 0.0) for o in outcomes for b, a in o.retrained_losses])]
    rows += [
        (
            name,
            [
                (before, after, o.constant_loss, float(gap))
                for o in outcomes
                for (before, after), gap in zip(o.edited_losses[name], o.same_seed_gaps(name), strict=True)
            ],
        )
        for name in chosen
    ]
    lines = [
        "The remaining rows' mean training loss (every set and seed; the retrains against their own seed's full "
        "model): after / before, and the share of what the model had learned about those rows (their loss below "
        "that of predicting the class frequencies) given back; an edit's diagnostics warn above "
        f"{100 * LEARNED_SHARE_WARNING:g}%. Beside them, the largest share given back by an edit whose test "
        "accuracy is within 1 point of its own seed's retrain, and the smallest by one more than 1 point below it.",
        "",
        "| model | after / before: median / max | share given back: min / median / 90th percentile / max | "
        f"above {100 * LEARNED_SHARE_WARNING:g}% | largest share within 1 pt | smallest share > 1 pt below |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, values in rows:
        ratios = np.array([after / before for before, after, _, _ in values])
        shares = np.array([given_back(before, after, constant) for before, after, constant, _ in values])
        gaps = np.array([gap for *_, gap in values])
        close, below = shares[np.abs(gaps) <= 0.01], shares[gaps < -0.01]
        lines.append(
            f"| {name} | {np.median(ratios):.2f} / {ratios.max():.2f} | {100 * shares.min():.2f}% / "
            f"{100 * np.median(shares):.2f}% / {100 * np.percentile(shares, 90):.2f}% / {100 * shares.max():.2f}% | "
            f"{np.sum(shares > LEARNED_SHARE_WARNING)}/{shares.size} | "
            f"{f'{100 * close.max():.2f}%' if close.size else '—'} | "
            f"{f'{100 * below.min():.2f}%' if below.size else '—'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer queries and seeds (a few minutes)")
    parser.add_argument("--only", choices=["mlp", "cnn", "mlp_narrow", "cnn_wide"], default=None)
    parser.add_argument("--fractions", default="1,10", help="proximity λ as multiples of the mean GN eigenvalue")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cg-max-iter", type=int, default=None, help="CG iterations per step (default: the edit's, by preconditioner)"
    )
    parser.add_argument("--cg-tol", type=float, default=EditOptions().cg_tol, help="CG stopping tolerance")
    parser.add_argument(
        "--variant", dest="variants", action="append", default=[], help="newton with options changed: key=value,..."
    )
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="removal set sizes")
    parser.add_argument("--queries", type=int, default=None, help="queries (default: 6 MLP, 3 CNN)")
    parser.add_argument("--seeds", type=int, default=2, help="retraining seeds per removal set")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument(
        "--fresh-scale", action="store_true", help="every edit computes the curvature scale (no reuse across edits)"
    )
    args = parser.parse_args()
    set_threads(args.threads)
    fractions = [float(f) for f in args.fractions.split(",")]
    default_queries = {"mlp": 3 if args.quick else 6, "cnn": 2 if args.quick else 3, "mlp_narrow": 6, "cnn_wide": 3}
    settings = {
        arch: Setting(arch, queries=args.queries or default_queries[arch], seeds=args.seeds, epochs=EPOCHS[arch])
        for arch in EPOCHS
    }
    archs = [args.only] if args.only else ["mlp", "cnn"]
    lines = [
        "# Edits against retraining (digits)",
        "",
        f"Command: `python -m benchmarks.edits_retraining {' '.join(sys.argv[1:])}`; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; torch {torch.__version__}, {args.threads} threads, CPU.",
        "",
        "Each seed's full model is edited and retrained without each set (the edit estimates the retrain of its "
        "own seed). Pearson and sign agreement: the mean over seeds of the edited models' query-loss changes (each "
        "against its own full model) against the mean over seeds of (retrained without the set − full retrain, same "
        "seed); the seed-0 edit's alone against the same mean beside them. Sign agreement where retraining "
        f"resolves it: over the values whose seed mean is more than {SIGN_RESOLUTION:g} standard errors from zero "
        "(agreeing / resolved). Own-query sets: each query's own loss "
        "over the queries; self-influence and random sets: every query's loss. Accuracy (397 test images): the mean "
        "over seeds of the edited models' test accuracy minus the retrained models' mean, and each seed's edited "
        "model against its own retrain. "
        + (
            "Every edit computes the default λ's curvature scale."
            if args.fresh_scale
            else "As the service runs edits, the first edit of each model (per estimator) computes the default λ's "
            "curvature scale and later edits of that model reuse it (its time is in the mean edit time)."
        ),
        "",
    ]
    for arch in archs:
        table_lines, _ = run_setting(
            arch,
            settings[arch],
            fractions,
            args.cg_max_iter,
            args.cg_tol,
            args.variants,
            tuple(int(k) for k in args.ks.split(",")),
            reuse_scale=not args.fresh_scale,
        )
        lines += table_lines
        print("\n".join(table_lines), flush=True)
    name = "edits_retraining_quick" if args.quick else "edits_retraining"
    suffix = (f"_{args.only}" if args.only else "") + (f"_{args.tag}" if args.tag else "")
    (RESULTS / f"{name}{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
