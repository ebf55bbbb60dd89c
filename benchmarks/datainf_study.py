"""Why DataInf trails EK-FAC on the LoRA LDS benchmark (lora_lds.py): explicit gradients, dense algebra.

    python -m benchmarks.datainf_study

On lora_lds.py's attributed model, training set, queries and cached ground truth, every variant is computed
from explicit per-token LoRA gradients (float64): DataInf's closed form (the mean of per-example damped
rank-one inverses) and the exact inverse of the same damped Fisher it approximates, for

* the damping: factors of the default lambda_l = 0.1 x mean_i ||g_il||^2 / d_l (= 0.1 x the mean eigenvalue
  of the layer's empirical Fisher);
* the layer granularity: each LoRA matrix (A, B separately: the engine's and the DataInf authors' code), each
  LoRA module (A and B together), the whole adapter;
* the Fisher: empirical per-sequence gradients (DataInf's), empirical per-token gradients (cross-token terms
  dropped), sampled labels (true Fisher, one draw).

No method here is tuned on the ground truth: the table reports every value of each sweep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, full_scores, write_result
from benchmarks.lora_lds import MODEL_SEED, ground_truth, lds
from benchmarks.tiny_lm import LoraRecipe, ModelSpec, finetune, lm_examples, pairwise_lm, pretrain
from worker.attribution import DataInfOptions, Examples, InfluenceOptions, attribute
from worker.attribution.hooks import default_layers

FACTORS = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


def all_position_gradients(
    model: nn.Module, names: list[str], data: Examples, sample: torch.Generator | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per-position gradient contributions g_t a_t^T at every non-padded position (they sum to the
    per-example gradient), (positions, d_l) per LoRA matrix, and each position's example index."""
    modules = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            inputs[name] = args[0].detach()
            out.retain_grad()
            outputs[name] = out

        handles.append(modules[name].register_forward_hook(hook))
    try:
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=data.inputs, attention_mask=data.attention_mask).logits[:, :-1]
        target = data.targets[:, 1:].clone()
        scored = target != -100
        if sample is not None:
            probs = torch.softmax(logits.detach().double(), -1)[scored]
            target[scored] = torch.multinomial(probs, 1, generator=sample).squeeze(1)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
        nll.backward()
    finally:
        for handle in handles:
            handle.remove()
    rows = data.attention_mask.bool()
    example = torch.arange(data.inputs.shape[0])[:, None].expand_as(rows)[rows]
    grads = {}
    for name in names:
        a = inputs[name][rows].double()
        g = outputs[name].grad[rows].double()
        grads[name] = torch.einsum("to,ti->toi", g, a).reshape(a.shape[0], -1)
    return grads, example


def per_example(grads: dict[str, torch.Tensor], example: torch.Tensor, n: int) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(n, v.shape[1], dtype=v.dtype).index_add_(0, example, v) for k, v in grads.items()}


def group(grads: dict[str, torch.Tensor], groups: list[list[str]]) -> list[torch.Tensor]:
    return [torch.cat([grads[name] for name in members], 1) for members in groups]


Apply = Callable[[float, torch.Tensor], torch.Tensor]


def datainf_inverse(fit: torch.Tensor, weight: float) -> Apply:
    """v -> (1/K) sum_k (lam I + w g_k g_k^T)^{-1} v for rows g_k of ``fit`` (Sherman-Morrison), v (Q, d)."""
    norms = weight * fit.pow(2).sum(1)

    def apply(lam: float, v: torch.Tensor) -> torch.Tensor:
        coeff = (v @ fit.T) * weight / (lam + norms)  # (Q, K)
        return (v - coeff @ fit / fit.shape[0]) / lam

    return apply


def exact_inverse(fit: torch.Tensor, weight: float) -> Apply:
    """v -> (lam I + (w/K) F^T F)^{-1} v for the rows F of ``fit``, v (Q, d): one eigendecomposition for
    every lam, of F^T F (d <= K) or of F F^T (K < d, Woodbury: (1/lam)(v - ((w/K) F^T (lam I + (w/K) F F^T)^{-1} F v)))."""
    scale = weight / fit.shape[0]
    if fit.shape[1] <= fit.shape[0]:
        values, vectors = torch.linalg.eigh(scale * fit.T @ fit)

        def apply(lam: float, v: torch.Tensor) -> torch.Tensor:
            return ((v @ vectors) / (values.clamp(min=0) + lam)) @ vectors.T

        return apply
    values, vectors = torch.linalg.eigh(scale * fit @ fit.T)
    projected = fit.T @ vectors  # (d, K)

    def apply_small(lam: float, v: torch.Tensor) -> torch.Tensor:
        inner = (v @ projected) / (values.clamp(min=0) + lam)  # (Q, K)
        return (v - scale * inner @ projected.T) / lam

    return apply_small


def scores(
    inverses: list[Apply], train: list[torch.Tensor], query: list[torch.Tensor], factor: float, n: int
) -> np.ndarray:
    """sum over groups of q^T P_l g_i, lambda_l = factor x 0.1 x mean_i ||g_il||^2 / d_l (per-example
    training gradients, whatever the fitting rows)."""
    total = torch.zeros(query[0].shape[0], n, dtype=torch.float64)
    for inverse, g, v in zip(inverses, train, query, strict=True):
        lam = factor * 0.1 * float(g.pow(2).sum(1).mean()) / g.shape[1]
        total += inverse(lam, v) @ g.T
    return total.numpy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--output", default="datainf_study")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec, recipe = ModelSpec(), LoraRecipe()
    base, tokenizer, world, base_info = pretrain(spec, 0, 150, 75)
    facts = world.finetune_facts[: args.train]
    train = lm_examples(tokenizer, world.finetune_sentences()[: args.train])
    prompts, objects = zip(*(f.query() for f in facts[::2]), strict=True)
    queries = lm_examples(tokenizer, list(objects), list(prompts))
    n = len(train)
    key = json.dumps([asdict(spec), base_info.get("pretrain_mean_loss")])
    masks, losses, _ = ground_truth(base, train, queries, recipe, 50, 2, key)
    truth_key = hashlib.sha1(json.dumps([asdict(recipe), 50, 2, n, key, "v1"]).encode()).hexdigest()[:10]
    model = finetune(base, train, recipe, seed=MODEL_SEED).model
    names = default_layers(model)
    rows: list[tuple[str, str, list[float]]] = []

    # the engine itself: DataInf (the check that the explicit gradients are the same as its) and EK-FAC
    result = attribute([model], train, queries, method="datainf", options=DataInfOptions(), **pairwise_lm(n))
    engine = full_scores(result, n).numpy()
    for label, options in (
        ("EK-FAC (engine), true Fisher, label seed 0", InfluenceOptions()),
        ("EK-FAC (engine), empirical Fisher", InfluenceOptions(fisher="empirical")),
    ):
        result = attribute([model], train, queries, method="influence", options=options, **pairwise_lm(n))
        rows.append((label, "matrix (A, B apart)", [lds(full_scores(result, n).numpy(), masks, losses)]))

    tok, ex = all_position_gradients(model, names, train)
    g_train = per_example(tok, ex, n)
    qtok, qex = all_position_gradients(model, names, queries)
    g_query = per_example(qtok, qex, len(queries))
    sampled_tok, sampled_ex = all_position_gradients(model, names, train, torch.Generator().manual_seed(0))
    g_sampled = per_example(sampled_tok, sampled_ex, n)

    matrices = [[name] for name in names]
    modules: dict[str, list[str]] = {}
    for name in names:
        modules.setdefault(name.split(".lora_")[0], []).append(name)
    granularities = {"matrix (A, B apart)": matrices, "module (A+B)": list(modules.values()), "whole adapter": [names]}

    dot = sum((g_query[k] @ g_train[k].T) for k in names).numpy()
    rows.append(("gradient dot product", "-", [lds(dot, masks, losses)]))
    print(rows, flush=True)
    per_matrix = group(g_train, matrices)
    check = scores([datainf_inverse(g, 1.0) for g in per_matrix], per_matrix, group(g_query, matrices), 1.0, n)
    agreement = float(np.abs(check - engine).max() / np.abs(check).max())

    for label, groups in granularities.items():
        tr, qu = group(g_train, groups), group(g_query, groups)
        fits = {
            "empirical, per sequence": (group(g_train, groups), 1.0),
            "sampled labels, per sequence": (group(g_sampled, groups), 1.0),
        }
        tokens = group(tok, groups)
        fits["empirical, per position"] = (tokens, tokens[0].shape[0] / n)
        for fit_label, (fit, weight) in fits.items():
            for method, make in (("DataInf", datainf_inverse), ("exact inverse", exact_inverse)):
                t0 = time.perf_counter()
                inverses = [make(rows_l, weight) for rows_l in fit]
                values = [lds(scores(inverses, tr, qu, f, n), masks, losses) for f in FACTORS]
                rows.append((f"{method}, {fit_label}", label, values))
                print(rows[-1], f"{time.perf_counter() - t0:.1f} s", flush=True)

    head = "| curvature | layer | " + " | ".join(f"λ × {f:g}" for f in FACTORS) + " |"
    table = [head, "|" + " --- |" * (len(FACTORS) + 2)]
    for method, layer, values in rows:
        if len(values) == 1:  # a method at its own default damping (none for the dot product)
            cells = [f"{values[0]:.3f}" if f == 1.0 else "" for f in FACTORS]
        else:
            cells = [f"{v:.3f}" for v in values]
        table.append(f"| {method} | {layer} | " + " | ".join(cells) + " |")
    body = "\n".join(
        [
            f"Ground truth: lora_lds.py's (results/lora_lds_truth_{truth_key}.npz) for the base pre-trained on this "
            f"machine (pre-training mean loss {base_info.get('pretrain_mean_loss'):.6f}).",
            "λ × 1 is DataInf's rule: λ_l = 0.1 × mean_i ‖g_il‖² / d_l (0.1 × the mean eigenvalue of the layer's "
            "empirical Fisher; the other rows' dampings use the same per-layer value).",
            "Rows with one value: the engine's EK-FAC at its default damping (0.1 × the mean eigenvalue) and the "
            "dot product (no damping). DataInf rows fit P_l on the given rows (per sequence: the examples' "
            "gradients; per position: each token's g_t a_tᵀ, weighted so that they sum to the per-token Fisher); "
            "queries and training examples are scored with their whole-sequence gradients in every row.",
            f"Check: explicit-gradient DataInf (matrix, λ × 1) vs the engine: max |diff| / max |score| {agreement:.1e}.",
            "",
            *table,
        ]
    )
    write_result(args.output, "DataInf on the LoRA LDS benchmark: damping, layers, Fisher", body)
    (RESULTS / f"{args.output}.json").write_text(
        json.dumps({"factors": FACTORS, "rows": [{"curvature": m, "layer": g, "lds": v} for m, g, v in rows]})
    )


if __name__ == "__main__":
    main()
