"""A sharded fit against the unsharded one, in the engine (no broker): how far the statistics differ, and the time of
each shard and of the merge, so the wall time with one worker per shard is max(shard) + merge (+ the second
phase's max(shard) + merge for EK-FAC).

    python -m benchmarks.sharded_fit [--train 20000] [--shard 5000] [--strategies ekfac,kfac,diagonal]

The model: MLP 64-256-256-10 (float32), true Fisher, one draw, batch 64, one thread (OMP_NUM_THREADS=1 unless
set). Writes benchmarks/results/sharded_fit.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import cast, get_args

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from torch import nn

from benchmarks.common import teacher_data
from worker.attribution import fit_curvature
from worker.attribution.fit_shards import (
    FitPhase,
    bases_from_sums,
    curvature_from_sums,
    first_phase,
    fit_shard_ranges,
    fit_shard_sums,
    reduce_sums,
)
from worker.attribution.options import FitOptions, FitStrategy
from worker.attribution.statistics import Eigenbasis, LayerSums

RESULTS = Path(__file__).parent / "results" / "sharded_fit.md"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10))


def measure(strategy: FitStrategy, train_size: int, shard: int) -> dict[str, float]:
    net = model()
    train, _ = teacher_data(train_size, 1)
    options = FitOptions(strategy=strategy, batch_size=64, memory_budget_bytes=0)
    started = time.perf_counter()
    reference = fit_curvature(net, train, "cross_entropy", options)
    unsharded = time.perf_counter() - started
    ranges = fit_shard_ranges(len(train), shard, options.batch_size)
    wall = 0.0

    def phase(name: FitPhase, bases: dict[str, Eigenbasis] | None = None) -> dict[str, LayerSums]:
        nonlocal wall
        parts, times = [], []
        for r in ranges:
            begun = time.perf_counter()
            parts.append(fit_shard_sums(net, train, "cross_entropy", options, r, name, bases))
            times.append(time.perf_counter() - begun)
        wall += max(times)
        return reduce_sums(parts)

    first = phase(first_phase(strategy))
    begun = time.perf_counter()
    bases = bases_from_sums(first) if strategy == "ekfac" else None
    wall += time.perf_counter() - begun
    second = phase("eigenvalues", bases) if bases is not None else None
    begun = time.perf_counter()
    sharded = curvature_from_sums(options, first, second)
    wall += time.perf_counter() - begun
    ours, theirs = sharded.to_tensors(), reference.to_tensors()
    deviation = max(
        float((ours[k].double() - theirs[k].double()).abs().max() / theirs[k].double().abs().max().clamp_min(1e-30))
        for k in theirs
        if "eigenvectors" not in k and "index_" not in k
    )
    return {"shards": len(ranges), "unsharded_s": unsharded, "sharded_wall_s": wall, "max_rel_dev": deviation}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=20000)
    parser.add_argument("--shard", type=int, default=5000)
    parser.add_argument("--strategies", default="ekfac,kfac,diagonal")
    args = parser.parse_args()
    lines = [
        "# Sharded fit vs unsharded fit (engine)",
        "",
        f"`python -m benchmarks.sharded_fit --train {args.train} --shard {args.shard}` on {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}. Model MLP 64-256-256-10 float32, "
        "true Fisher, batch 64. *Sharded wall*: one worker per shard (max shard time per phase + the merges).",
        "*Max rel. dev.*: largest |sharded - unsharded| / max |unsharded| over the stored statistics (eigenvectors "
        "excluded: equal up to sign).",
        "",
        "| strategy | shards | unsharded fit (s) | sharded wall (s) | max rel. dev. |",
        "| --- | --- | --- | --- | --- |",
    ]
    for strategy in args.strategies.split(","):
        if strategy not in get_args(FitStrategy):
            raise SystemExit(f"unknown strategy {strategy!r}")
        row = measure(cast(FitStrategy, strategy), args.train, args.shard)
        lines.append(
            f"| {strategy} | {row['shards']:.0f} | {row['unsharded_s']:.2f} | {row['sharded_wall_s']:.2f} | "
            f"{row['max_rel_dev']:.1e} |"
        )
        print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
