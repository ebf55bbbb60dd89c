"""DataInf against EK-FAC influence at GPT-2-small width with LoRA: the time of each, one process, one model.

    python -m benchmarks.datainf_cost [--layers 12] [--train 256] [--queries 16] [--repeats 1]

The model and data are those of `benchmarks.hf_vs_kronfluence`'s cost part (GPT-2 n_layer 12, n_embd 768, LoRA rank
8 on c_attn and c_proj, random adapters; 256 training sequences and 16 queries of 64 random tokens, batch size 16,
2 torch threads). Each method runs as a user runs it, fit included: EK-FAC influence with its defaults (the true
Fisher: labels sampled from the model, as kronfluence does), the same with the empirical Fisher, DataInf (closed
form per layer, no fit) and gradient similarity (identity curvature: the floor, one gradient pass over the training
set and the queries). Reports wall and CPU seconds, DataInf's time as a fraction of EK-FAC's (issue target ≤ 0.3),
and the mean per-query Spearman correlation of DataInf's and EK-FAC's scores. Writes
benchmarks/results/datainf_cost.md (earlier runs kept below).

On the tiny LoRA model of `benchmarks.lora_lds` (n_embd 64, 2 layers) every method costs a few tenths of a second,
fixed costs dominate and DataInf takes 0.37x EK-FAC's time; this run asks the same question at the size the issue
names as realistic.
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import Timer, full_scores, rowwise_spearman, set_threads, write_keeping_earlier_runs
from benchmarks.hf_vs_kronfluence import SMALL, lora_gpt2, random_sequences
from worker.attribution import DataInfOptions, GradientSimilarityOptions, InfluenceOptions, attribute

RESULTS = Path(__file__).parent / "results" / "datainf_cost.md"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=SMALL.n_layer)
    parser.add_argument("--train", type=int, default=SMALL.num_train)
    parser.add_argument("--queries", type=int, default=SMALL.num_queries)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method (the median is reported)")
    args = parser.parse_args()
    set_threads(2)
    setup = SMALL.__class__(
        **{**SMALL.__dict__, "n_layer": args.layers, "num_train": args.train, "num_queries": args.queries}
    )
    model = lora_gpt2(setup, random_adapters=True)
    for parameter in model.parameters():  # gradients are taken through the hooks only
        parameter.requires_grad_(False)
    train = random_sequences(setup, setup.num_train, seed=1)
    queries = random_sequences(setup, setup.num_queries, seed=2)
    batch = setup.batch_size
    common: dict[str, Any] = {"loss": "causal_lm", "mode": "pairwise", "measurement": "loss", "top_k": len(train)}
    methods: dict[str, Callable[[], Any]] = {
        "EK-FAC influence, true Fisher (defaults), fit + pairwise": lambda: attribute(
            [model], train, queries, method="influence", options=InfluenceOptions(batch_size=batch), **common
        ),
        "EK-FAC influence, empirical Fisher, fit + pairwise": lambda: attribute(
            [model],
            train,
            queries,
            method="influence",
            options=InfluenceOptions(fisher="empirical", batch_size=batch),
            **common,
        ),
        "DataInf": lambda: attribute(
            [model], train, queries, method="datainf", options=DataInfOptions(batch_size=batch), **common
        ),
        "gradient similarity (dot product)": lambda: attribute(
            [model],
            train,
            queries,
            method="gradient_similarity",
            options=GradientSimilarityOptions(batch_size=batch),
            **common,
        ),
    }
    seconds: dict[str, tuple[float, float]] = {}
    scores: dict[str, np.ndarray] = {}
    datainf_used: dict[str, Any] = {}
    for name, run in methods.items():
        walls, cpus = [], []
        for _ in range(args.repeats):
            with Timer() as timer:
                result = run()
            walls.append(timer.seconds)
            cpus.append(timer.cpu_seconds)
        seconds[name] = (float(np.median(walls)), float(np.median(cpus)))
        scores[name] = full_scores(result, len(train)).numpy()
        if name == "DataInf":
            datainf_used = result.diagnostics["models"][0]
        print(f"{name}: {seconds[name][0]:.1f} s wall, {seconds[name][1]:.1f} s CPU", flush=True)
    write_keeping_earlier_runs(RESULTS, report(args, setup.describe(), seconds, scores, datainf_used))


def report(
    args: argparse.Namespace,
    described: str,
    seconds: dict[str, tuple[float, float]],
    scores: dict[str, np.ndarray],
    datainf_used: dict[str, Any],
) -> str:
    ekfac = "EK-FAC influence, true Fisher (defaults), fit + pairwise"
    empirical = "EK-FAC influence, empirical Fisher, fit + pairwise"
    rows = [
        f"| {name} | {wall:.1f} | {cpu:.1f} | {wall / seconds[ekfac][0]:.3f} |" for name, (wall, cpu) in seconds.items()
    ]
    agreement = float(np.nanmean(rowwise_spearman(scores["DataInf"], scores[ekfac])))
    ratio = seconds["DataInf"][0] / seconds[ekfac][0]
    ratio_empirical = seconds["DataInf"][0] / seconds[empirical][0]
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# DataInf against EK-FAC at GPT-2-small width (LoRA)",
            "",
            f"`python -m benchmarks.datainf_cost --layers {args.layers} --train {args.train} --queries "
            f"{args.queries} --repeats {args.repeats}` on {platform.machine()} ({platform.python_version()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads), {when}.",
            "",
            f"{described}; every method as a user runs it (fit included), median of {args.repeats} run(s).",
            "",
            "| method | wall seconds | CPU seconds | time / EK-FAC's (defaults) |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"- DataInf / EK-FAC (defaults): **{ratio:.3f}×** the time (target ≤ 0.3×: "
            f"{'met' if ratio <= 0.3 else 'not met'}); against EK-FAC with the empirical Fisher: {ratio_empirical:.3f}×.",
            f"- Mean per-query Spearman correlation of DataInf's and EK-FAC's scores: {agreement:.3f}.",
            f"- DataInf's training passes: {1 + int(datainf_used.get('training_passes', 0))} model pass(es) "
            f"(its first pass's activities kept: {datainf_used.get('cached_training_activities')}, in mapped "
            f"temporary files: {datainf_used.get('cached_activities_spilled')}).",
        ]
    )


if __name__ == "__main__":
    main()
