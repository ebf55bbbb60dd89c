"""Fact tracing on a LoRA-fine-tuned tiny GPT-2: which training sentence taught the model a fact?

    benchmarks/.venv-kron/bin/python -m benchmarks.fact_tracing            # full run
    benchmarks/.venv-kron/bin/python -m benchmarks.fact_tracing --no-kron  # without kronfluence (project venv)

A 2-layer GPT-2 with a word-level vocabulary is pre-trained here on templated sentences about invented
countries (benchmarks/tiny_lm.py), then LoRA-fine-tuned (SGD with momentum, a checkpoint every few epochs)
on one sentence per new fact ("The capital of Zorbia is Quellin ."; three training templates per relation,
four relations; the language, currency and leader objects are shared by several countries). Each query
states one fine-tuned fact with a held-out paraphrase ("The capital city of Zorbia is" -> "Quellin"); only
the completion token is scored (measurement: loss). The right answer is the one training sentence that
states the fact; we report recall@10 (it is among the 10 highest scores) and MRR (mean of 1/rank).

Methods: the engine's EK-FAC influence, DataInf, gradient similarity (cosine) on the final model, TracInCP
and SOURCE on the kept checkpoints, kronfluence 1.0.1 EK-FAC on the same LoRA modules, and BM25 text
retrieval (query = prompt + completion, and prompt only).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from benchmarks.common import RESULTS, Timer, full_scores, write_result
from benchmarks.tiny_lm import (
    KronfluenceLM,
    LoraRecipe,
    ModelSpec,
    accuracy,
    bm25,
    example_losses,
    finetune,
    lm_examples,
    our_methods,
    pairwise_lm,
    pretrain,
)
from worker.attribution import (
    InfluenceOptions,
    attribute,
)
from worker.attribution.hooks import default_layers


def ranks(scores: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of training example q for query q; ties count against the method (pessimistic)."""
    right = scores[np.arange(len(scores)), np.arange(len(scores))]
    return 1 + (scores >= right[:, None]).sum(1) - 1


def metrics(scores: np.ndarray) -> dict[str, float]:
    r = ranks(scores)
    return {"recall@1": float((r <= 1).mean()), "recall@10": float((r <= 10).mean()), "mrr": float((1 / r).mean())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrain-countries", type=int, default=150)
    parser.add_argument("--finetune-countries", type=int, default=75, help="4 fine-tuned facts each")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--no-kron", action="store_true")
    parser.add_argument("--output", default="fact_tracing")
    args = parser.parse_args()
    torch.set_num_threads(1)

    spec = ModelSpec()
    recipe = LoraRecipe(epochs=args.epochs, lr=args.lr)
    with Timer() as t_base:
        base, tokenizer, world, base_info = pretrain(spec, 0, args.pretrain_countries, args.finetune_countries)
    sentences = world.finetune_sentences()
    train = lm_examples(tokenizer, sentences)
    prompts, objects = zip(*(f.query() for f in world.finetune_facts), strict=True)
    queries = lm_examples(tokenizer, list(objects), list(prompts))
    n = len(train)
    with Timer() as t_ft:
        tuned = finetune(base, train, recipe, seed=0, keep_checkpoints=True)
    model = tuned.model
    stated = lm_examples(
        tokenizer, [f.obj for f in world.finetune_facts], [s.rsplit(" ", 2)[0] for s in sentences]
    )  # the training sentence itself up to its object (where the object is last)
    object_last = np.array([s.endswith(f"{f.obj} .") for s, f in zip(sentences, world.finetune_facts, strict=True)])
    info = {
        "base": base_info,
        "pretrain_seconds (0 if cached)": t_base.seconds,
        "finetune_seconds": t_ft.seconds,
        "paraphrase query accuracy, base": accuracy(base, queries),
        "paraphrase query accuracy, fine-tuned": accuracy(model, queries),
        "paraphrase query mean completion loss (nats), base": float(example_losses(base, queries).mean()),
        "paraphrase query mean completion loss (nats), fine-tuned": float(example_losses(model, queries).mean()),
        "training-template accuracy, fine-tuned (object-last templates)": accuracy(
            model, stated.subset(torch.from_numpy(np.flatnonzero(object_last)))
        ),
    }
    print(json.dumps(info, indent=1), flush=True)

    common = pairwise_lm(n)
    runs = our_methods(model, tuned.checkpoints, train, queries, top_k=n)
    rows: list[tuple[str, dict[str, float], float]] = []
    for name, run in runs.items():
        with Timer() as t:
            scores = full_scores(run(), n).numpy()
        rows.append((name, metrics(scores), t.seconds))
        print(rows[-1], flush=True)
    # the true Fisher samples labels: EK-FAC of both tools over three sampling seeds (ours: its label seed;
    # kronfluence: torch's global seed), and both with the empirical Fisher (deterministic)
    seeded: dict[str, list[dict[str, float]]] = {"ours": [], "kronfluence": []}
    for seed in (0, 1, 2):
        result = attribute([model], train, queries, method="influence", options=InfluenceOptions(seed=seed), **common)
        seeded["ours"].append(metrics(full_scores(result, n).numpy()))
    result = attribute(
        [model], train, queries, method="influence", options=InfluenceOptions(fisher="empirical"), **common
    )
    rows.append(("EK-FAC influence, empirical Fisher (ours)", metrics(full_scores(result, n).numpy()), 0.0))
    if not args.no_kron:
        layers = default_layers(model)
        times = []
        for seed in (0, 1, 2):
            with Timer() as t:
                torch.manual_seed(seed)
                scores = KronfluenceLM(model, layers).pairwise(train, queries).numpy()
            seeded["kronfluence"].append(metrics(scores))
            times.append(t.seconds)
        rows.append(("kronfluence 1.0.1 EK-FAC (defaults, torch seed 0)", seeded["kronfluence"][0], times[0]))
        scores = KronfluenceLM(model, layers).pairwise(train, queries, empirical=True).numpy()
        rows.append(("kronfluence 1.0.1 EK-FAC, empirical Fisher", metrics(scores), 0.0))
        print(rows[-2:], flush=True)
    for tool, values in seeded.items():
        if values:
            mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
            spread = ", ".join(f"{v['recall@10']:.3f}" for v in values)
            label = "EK-FAC influence (ours)" if tool == "ours" else "kronfluence 1.0.1 EK-FAC"
            rows.append((f"{label}, mean of 3 sampling seeds (recall@10 {spread})", mean, 0.0))
    for label, texts in (
        ("BM25, query = prompt + completion", [f"{p} {o}" for p, o in zip(prompts, objects, strict=True)]),
        ("BM25, query = prompt only", list(prompts)),
    ):
        with Timer() as t:
            scores = bm25(sentences, texts)
        rows.append((label, metrics(scores), t.seconds))

    ours = [r for r in rows if "(ours)" in r[0] and "seed" not in r[0]]
    ours += [r for r in rows if r[0].startswith("EK-FAC influence (ours), mean")]
    best = max(ours, key=lambda r: (r[1]["recall@10"], r[1]["mrr"]))
    kron = next((r for r in rows if r[0].startswith("kronfluence 1.0.1 EK-FAC, mean")), None)
    bm = rows[-2]
    table = [
        "| method | recall@1 | recall@10 | MRR | seconds |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {m} | {v['recall@1']:.3f} | {v['recall@10']:.3f} | {v['mrr']:.3f} | {f'{s:.1f}' if s else '–'} |"
            for m, v, s in rows
        ],
    ]
    verdict = [
        f"- Best of ours by recall@10: {best[0]} {best[1]['recall@10']:.3f} (MRR {best[1]['mrr']:.3f}).",
        (
            f"- Target best ≥ kronfluence (mean of 3 seeds, {kron[1]['recall@10']:.3f}): "
            f"{'met' if best[1]['recall@10'] >= kron[1]['recall@10'] else 'NOT met'}."
            if kron
            else "- kronfluence not run."
        ),
        f"- Stretch best ≥ BM25 (prompt + completion, {bm[1]['recall@10']:.3f}): "
        f"{'met' if best[1]['recall@10'] >= bm[1]['recall@10'] else 'NOT met'}.",
    ]
    body = "\n".join(
        [
            f"World: {args.pretrain_countries} pre-training countries, {args.finetune_countries} fine-tuned "
            f"countries × 4 relations = N = {n} fine-tuning sentences (one per fact), Q = {len(queries)} "
            "paraphrase queries (one per fine-tuned fact); vocabulary "
            f"{int(base_info['vocabulary'])} words.",
            f"Model: GPT-2 {spec.n_layer} layers, n_embd {spec.n_embd}, {spec.n_head} heads, pre-trained "
            f"{spec.pretrain_epochs} epochs (AdamW, one-cycle lr {spec.pretrain_lr}) on "
            f"{int(base_info['pretrain_sentences'])} sentences.",
            f"LoRA: rank {recipe.rank}, alpha {recipe.alpha}, on {', '.join(recipe.targets)}; SGD lr {recipe.lr} "
            f"momentum {recipe.momentum}, batch {recipe.batch}, {recipe.epochs} epochs, {len(tuned.checkpoints)} "
            "checkpoints (TracInCP, SOURCE). Tracked layers: the LoRA A/B linears (the engine's default).",
            "Defaults everywhere: EK-FAC true Fisher, 1 sampled label, damping 0.1 × mean eigenvalue; DataInf "
            "damping 0.1 × mean ‖g‖²/d; SOURCE 3 segments, no damping; kronfluence EK-FAC, true Fisher, "
            "damping_factor None.",
            "",
            "```",
            json.dumps(info, indent=1),
            "```",
            "",
            *table,
            "",
            *verdict,
        ]
    )
    write_result(args.output, "Fact tracing on a LoRA-fine-tuned tiny GPT-2", body)
    (RESULTS / f"{args.output}.json").write_text(
        json.dumps({"info": info, "rows": [{"method": m, **v, "seconds": s} for m, v, s in rows]}, indent=1)
    )


if __name__ == "__main__":
    main()
