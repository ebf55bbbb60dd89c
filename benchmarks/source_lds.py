"""LDS of SOURCE against EK-FAC influence (final model), TracInCP and gradient similarity (cosine and dot product)
on scikit-learn's digits.

Two settings, each with one ground truth shared by every method (retraining on random half subsets of the
attributed data with the same recipe, measuring each query's margin):

a. not converged: a small MLP trained for a few epochs by minibatch SGD on digits with 20% of the training
   labels corrupted; a checkpoint every epoch; queries are clean test digits.
b. two stages: stage 1 trains on one part of digits, stage 2 continues on another part whose images are
   shifted (rolled) by two pixels; queries are shifted test digits; the stage-1 data are attributed.

LDS = mean over queries of Spearman(sum of the subset's scores, the query's margin after retraining on that
subset). Run: ``python benchmarks/source_lds.py`` (writes benchmarks/results/source_lds.md).
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from worker.attribution import AttributionScores, Examples, GradientSimilarityOptions, InfluenceOptions, attribute
from worker.attribution.losses import margins
from worker.attribution.methods.source import SourceOptions, attribute_source
from worker.attribution.methods.tracin import attribute_tracin
from worker.attribution.trajectory import TrajectoryCheckpoint

RESULTS = Path(__file__).parent / "results" / "source_lds.md"
DEFAULT_SOURCE = "SOURCE (full, default segments)"


@dataclass
class Stage:
    data: Examples
    epochs: int


@dataclass
class Setting:
    name: str
    description: str
    stages: list[Stage]
    attributed_stage: int
    queries: Examples
    lr: float
    batch_size: int


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long)


def shifted(x: torch.Tensor, pixels: int = 2) -> torch.Tensor:
    return torch.roll(x.reshape(-1, 8, 8), shifts=pixels, dims=2).reshape(-1, 64)


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def train(
    setting: Setting, subset: torch.Tensor | None, seed: int, keep_checkpoints: bool
) -> tuple[nn.Module, list[TrajectoryCheckpoint]]:
    """Minibatch SGD through the stages; ``subset`` (rows of the attributed stage's data) replaces that stage's
    data. A checkpoint at the end of every epoch."""
    model = make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=setting.lr)
    generator = torch.Generator().manual_seed(seed)
    checkpoints: list[TrajectoryCheckpoint] = []
    step = 0
    for index, stage in enumerate(setting.stages):
        data = stage.data if subset is None or index != setting.attributed_stage else stage.data.subset(subset)
        for _ in range(stage.epochs):
            order = torch.randperm(len(data), generator=generator)
            for first in range(0, len(data), setting.batch_size):
                rows = order[first : first + setting.batch_size]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(data.inputs[rows]), data.targets[rows]).backward()
                optimizer.step()
                step += 1
            if keep_checkpoints:
                checkpoints.append(TrajectoryCheckpoint(copy.deepcopy(model).eval(), step, setting.lr, 0.0, index))
    return model.eval(), checkpoints


def ground_truth(setting: Setting, subsets: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(masks (M, N) of the half subsets, margins (M, Q) after retraining on each)."""
    n = len(setting.stages[setting.attributed_stage].data)
    generator = torch.Generator().manual_seed(seed)
    masks, outcomes = [], []
    for m in range(subsets):
        rows = torch.randperm(n, generator=generator)[: n // 2].sort().values
        model, _ = train(setting, rows, seed=1000 + m, keep_checkpoints=False)
        with torch.no_grad():
            outcomes.append(margins(model(setting.queries.inputs), setting.queries.targets))
        mask = torch.zeros(n)
        mask[rows] = 1
        masks.append(mask)
    return torch.stack(masks), torch.stack(outcomes)


def lds(scores: torch.Tensor, masks: torch.Tensor, outcomes: torch.Tensor) -> float:
    """scores (Q, N): mean over queries of Spearman(subset sums, margins)."""
    predicted = masks.double() @ scores.double().T  # (M, Q)
    values = [spearmanr(predicted[:, q].numpy(), outcomes[:, q].numpy()).statistic for q in range(scores.shape[0])]
    return float(np.nanmean(values))


def full_matrix(result: AttributionScores, n: int) -> torch.Tensor:
    topk = result.topk
    assert topk is not None, "a pairwise result"
    matrix = torch.full((topk.positive_indices.shape[0], n), float("nan"), dtype=torch.float64)
    matrix.scatter_(1, topk.positive_indices, topk.positive_scores.double())
    return matrix


def method_scores(
    setting: Setting, final: nn.Module, checkpoints: list[TrajectoryCheckpoint]
) -> dict[str, tuple[torch.Tensor, float]]:
    stage_data = {i: s.data for i, s in enumerate(setting.stages)}
    train = stage_data[setting.attributed_stage]
    n, queries = len(train), setting.queries
    common = {"loss": "cross_entropy", "measurement": "margin", "mode": "pairwise", "top_k": n}
    scores: dict[str, torch.Tensor] = {}
    timings: dict[str, float] = {}
    runs = {
        DEFAULT_SOURCE: lambda: attribute_source(
            final,
            checkpoints,
            stage_data,
            train,
            queries,
            options=SourceOptions(),
            attributed_stages=[setting.attributed_stage],
            **common,
        ),
        "SOURCE (averaged_parameters)": lambda: attribute_source(
            final,
            checkpoints,
            stage_data,
            train,
            queries,
            options=SourceOptions(variant="averaged_parameters"),
            attributed_stages=[setting.attributed_stage],
            **common,
        ),
        "SOURCE (full, one segment per checkpoint)": lambda: attribute_source(
            final,
            checkpoints,
            stage_data,
            train,
            queries,
            options=SourceOptions(segments=len(checkpoints)),
            attributed_stages=[setting.attributed_stage],
            **common,
        ),
        "EK-FAC influence (final model)": lambda: attribute(
            final, train, queries, method="influence", options=InfluenceOptions(), **common
        ),
        "TracInCP": lambda: attribute_tracin(
            [c for c in checkpoints if c.stage == setting.attributed_stage], train, queries, **common
        ),
        "gradient similarity (cosine)": lambda: attribute(
            final,
            train,
            queries,
            method="gradient_similarity",
            options=GradientSimilarityOptions(normalize=True),
            **common,
        ),
        "gradient dot product (final model)": lambda: attribute(
            final,
            train,
            queries,
            method="gradient_similarity",
            options=GradientSimilarityOptions(normalize=False),
            **common,
        ),
    }
    for name, run in runs.items():
        start = time.perf_counter()
        scores[name] = full_matrix(run(), n)
        timings[name] = time.perf_counter() - start
    return {name: (scores[name], timings[name]) for name in scores}


def settings(seed: int) -> list[Setting]:
    x, y = load_digits_tensors()
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=generator)
    train_rows, test_rows = order[:1000], order[1000:1100]
    noisy = y[train_rows].clone()
    corrupt = torch.randperm(1000, generator=generator)[:200]
    noisy[corrupt] = (noisy[corrupt] + torch.randint(1, 10, (200,), generator=generator)) % 10
    a = Setting(
        "a. not converged, 20% labels corrupted",
        "1000 training digits (200 labels corrupted), 5 epochs of SGD (lr 0.3, batch 32), a checkpoint per epoch",
        [Stage(Examples(inputs=x[train_rows], targets=noisy), epochs=5)],
        0,
        Examples(inputs=x[test_rows], targets=y[test_rows]),
        lr=0.3,
        batch_size=32,
    )
    stage1_rows, stage2_rows, query_rows = order[:700], order[700:1100], order[1100:1200]
    b = Setting(
        "b. two stages, stage 2 on shifted digits",
        "stage 1: 700 digits, 4 epochs; stage 2: 400 other digits rolled 2 pixels right, 4 epochs "
        "(SGD lr 0.05, batch 32, a checkpoint per epoch); queries: shifted test digits; attributed: stage 1",
        [
            Stage(Examples(inputs=x[stage1_rows], targets=y[stage1_rows]), epochs=4),
            Stage(Examples(inputs=shifted(x[stage2_rows]), targets=y[stage2_rows]), epochs=4),
        ],
        0,
        Examples(inputs=shifted(x[query_rows]), targets=y[query_rows]),
        lr=0.05,
        batch_size=32,
    )
    return [a, b]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--subsets", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lines = [
        "# SOURCE LDS on digits",
        "",
        f"Command: `python benchmarks/source_lds.py --subsets {args.subsets} --seed {args.seed} --threads {args.threads}`",
        "",
        "MLP 64-32-10 (tanh), float32, CPU. Ground truth: retraining on random half subsets of the attributed "
        f"data ({args.subsets} subsets, same recipe), query margins; the same ground truth for every method of a setting. "
        "LDS = mean over queries of Spearman(sum of subset scores, margin). Measurement: margin. Defaults: SOURCE "
        "segments null (3 equal parts; one per stage with stages), fisher true with 1 sample, no damping; "
        "EK-FAC influence damping 0.1 x mean eigenvalue.",
        "",
    ]
    for setting in settings(args.seed):
        final, checkpoints = train(setting, None, seed=args.seed, keep_checkpoints=True)
        with torch.no_grad():
            accuracy = float((final(setting.queries.inputs).argmax(1) == setting.queries.targets).float().mean())
        truth_start = time.perf_counter()
        masks, outcomes = ground_truth(setting, args.subsets, args.seed + 1)
        truth_seconds = time.perf_counter() - truth_start
        results = method_scores(setting, final, checkpoints)
        figures = {name: lds(scores, masks, outcomes) for name, (scores, _) in results.items()}
        lines += [
            f"## {setting.name}",
            "",
            setting.description + f". Query accuracy of the final model: {accuracy:.2f}. "
            f"{len(checkpoints)} checkpoints; ground truth took {truth_seconds:.0f} s.",
            "",
            "| method | LDS | seconds |",
            "|---|---|---|",
        ]
        lines += [f"| {name} | {figures[name]:.3f} | {results[name][1]:.1f} |" for name in results]
        best_source = figures[DEFAULT_SOURCE]  # the target is judged on the default configuration only
        best_other = max(v for k, v in figures.items() if not k.startswith("SOURCE"))
        lines += [
            "",
            f"SOURCE (default) {best_source:.3f} vs best other {best_other:.3f}: margin "
            f"{best_source - best_other:+.3f} "
            f"(target +0.05: {'met' if best_source >= best_other + 0.05 else 'missed'}).",
            "",
        ]
        print("\n".join(lines[-(len(results) + 6) :]), flush=True)
    lines.append(f"Total runtime: {time.perf_counter() - started:.0f} s.")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
