"""Hugging Face causal LM with LoRA adapters: our engine vs kronfluence 1.0.1 (agreement and cost).

    benchmarks/.venv-kron/bin/python -m benchmarks.hf_vs_kronfluence                     # both parts
    benchmarks/.venv-kron/bin/python -m benchmarks.hf_vs_kronfluence --only agreement    # tiny GPT-2, minutes
    benchmarks/.venv-kron/bin/python -m benchmarks.hf_vs_kronfluence --only cost --repeats 1

(benchmarks/.venv-kron from benchmarks/setup_kronfluence.sh, plus transformers and peft.) Nothing is
downloaded: the models are random-init GPT-2s built from a config, the data synthetic.

Both tools: the summed next-token NLL of the scored tokens (labels -100 not scored, padding masked: kronfluence's
``get_attention_mask``), EMPIRICAL Fisher, tracked modules = the peft LoRA ``lora_A`` / ``lora_B`` linears
(``hooks.default_layers``), the same batch sizes, float32, CPU, torch.set_num_threads(2).
Damping: (i) each tool's default (ours 0.1 x mean(Lambda) per layer; kronfluence damping_factor=None: 0.1 x
mean(Lambda) per module), (ii) one explicit absolute value for both (the median of our default per-layer ones).

Part 1, agreement: a tiny GPT-2 (2 layers, width 32, vocabulary 64) whose LoRA adapters (rank 4 on c_attn and
c_proj) are fine-tuned on sequences of a random sparse Markov chain (prompts of 2 tokens not scored, right
padding); per-query Spearman of the pairwise scores, and self-influence, for EK-FAC, K-FAC and identity.

Part 2, cost: a GPT-2-small-shaped model (12 layers, width 768, 12 heads, vocabulary 50257, 124M parameters,
random init) with LoRA rank 8 on c_attn and c_proj (peft's suffix match: attn.c_attn, attn.c_proj and mlp.c_proj:
72 tracked linears, 811k adapter parameters), 256 training sequences of 64 random tokens, 16 queries; EK-FAC fit
(factors, eigendecompositions, corrected eigenvalues) + pairwise scores (all 256 per query). Each side runs in
a fresh subprocess (peak RSS from getrusage), the sides alternate, ``--repeats`` times.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    RESULTS,
    KronfluenceRunner,
    Timer,
    full_scores,
    rowwise_spearman,
    set_threads,
    write_result,
)
from worker.attribution import Examples, FitOptions, InfluenceOptions, attribute, fit_curvature
from worker.attribution.hooks import default_layers
from worker.attribution.text import IGNORE_INDEX, TextBatch

# ---------------------------------------------------------------- models and data


@dataclass(frozen=True)
class LmSetup:
    """A GPT-2 shape, its LoRA adapters and the synthetic data."""

    vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int
    rank: int
    num_train: int
    num_queries: int
    length: int  # padded length
    shortest: int  # shortest sequence (== length: no padding)
    prompt: int  # leading tokens not scored
    batch_size: int
    targets: tuple[str, ...] = ("c_attn", "c_proj")  # peft target_modules (suffix match)

    def describe(self) -> str:
        return (
            f"GPT-2 n_layer {self.n_layer}, n_embd {self.n_embd}, n_head {self.n_head}, vocabulary {self.vocab}; "
            f"LoRA rank {self.rank} (alpha {2 * self.rank}) on {' and '.join(self.targets)}; {self.num_train} training "
            f"sequences and {self.num_queries} queries of {self.shortest}-{self.length} tokens (first {self.prompt} "
            f"not scored), batch size {self.batch_size}"
        )


TINY = LmSetup(
    vocab=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, rank=4, num_train=256, num_queries=32, length=24,
    shortest=10, prompt=2, batch_size=64,
)  # fmt: skip
SMALL = LmSetup(
    vocab=50257, n_embd=768, n_layer=12, n_head=12, n_positions=1024, rank=8, num_train=256, num_queries=16,
    length=64, shortest=64, prompt=0, batch_size=16,
)  # fmt: skip
QUICK_SMALL = LmSetup(
    vocab=50257, n_embd=768, n_layer=2, n_head=12, n_positions=1024, rank=8, num_train=32, num_queries=4,
    length=64, shortest=64, prompt=0, batch_size=16,
)  # fmt: skip


def lora_gpt2(setup: LmSetup, seed: int = 0, random_adapters: bool = False) -> nn.Module:
    """A random-init GPT-2 (no dropout, eager attention) with peft LoRA adapters on c_attn and c_proj.
    ``random_adapters``: B initialised randomly too (peft's init_lora_weights=False), so that lora_A has
    gradients without training."""
    import peft
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=setup.vocab,
        n_positions=setup.n_positions,
        n_embd=setup.n_embd,
        n_layer=setup.n_layer,
        n_head=setup.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
    )
    base = transformers.GPT2LMHeadModel(config)
    lora = peft.LoraConfig(
        r=setup.rank,
        lora_alpha=2 * setup.rank,
        target_modules=list(setup.targets),
        fan_in_fan_out=True,
        lora_dropout=0.0,
        init_lora_weights=not random_adapters,
    )
    return peft.get_peft_model(base, lora).eval()


def markov_sequences(setup: LmSetup, n: int, seed: int, successors: int = 4) -> Examples:
    """Sequences of a random sparse Markov chain over tokens 1..vocab-1 (0 = padding): each token has
    ``successors`` likely next tokens (Dirichlet weights) and a little uniform mass; right-padded."""
    g = torch.Generator().manual_seed(1234)  # the chain: the same for every call
    tokens = setup.vocab - 1
    transition = torch.full((tokens, tokens), 0.02 / tokens)
    for row in range(tokens):
        nxt = torch.randperm(tokens, generator=g)[:successors]
        transition[row, nxt] += 0.98 * torch.distributions.Dirichlet(torch.ones(successors)).sample()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(setup.shortest, setup.length + 1, (n,), generator=g)
    sequences = []
    for k in lengths.tolist():
        seq = [int(torch.randint(tokens, (1,), generator=g))]
        for _ in range(k - 1):
            seq.append(int(torch.multinomial(transition[seq[-1]], 1, generator=g)))
        sequences.append([t + 1 for t in seq])
    return TextBatch.padded(sequences, 0, prompt_lengths=[setup.prompt] * n, length=setup.length).examples()


def random_sequences(setup: LmSetup, n: int, seed: int) -> Examples:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(setup.vocab, (n, setup.length), generator=g)
    return TextBatch(ids, torch.ones_like(ids), ids.clone()).examples()


def lm_loss(model: nn.Module, batch: Examples) -> torch.Tensor:
    """Mean over scored tokens of the next-token NLL (the fine-tuning objective)."""
    logits = model(input_ids=batch.inputs, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.targets[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


def finetune(model: nn.Module, train: Examples, steps: int = 300, lr: float = 3e-3, batch: int = 32) -> tuple:
    """Adam on the LoRA parameters only (peft freezes the rest); returns (loss before, loss after) on ``train``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        before = float(lm_loss(model, train))
    for _ in range(steps):
        rows = torch.randint(len(train), (batch,), generator=g)
        loss = lm_loss(model, train.subset(rows))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(lm_loss(model, train))
    return before, after


# ---------------------------------------------------------------- kronfluence's side


def kron_runner(model: nn.Module, layers: list[str], copy_model: bool = True) -> KronfluenceRunner:
    from kronfluence.task import Task

    class CausalLmTask(Task):
        """Summed next-token NLL of the scored tokens (labels -100 ignored), as kronfluence's own LM examples."""

        def compute_train_loss(self, batch, model, sample=False):
            ids, mask, labels = batch
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].flatten(0, 1)
            targets = labels[:, 1:].flatten()
            if sample:
                with torch.no_grad():
                    drawn = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
                    targets = drawn.masked_fill(targets == IGNORE_INDEX, IGNORE_INDEX)
            return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")

        def compute_measurement(self, batch, model):
            return self.compute_train_loss(batch, model, sample=False)

        def get_influence_tracked_modules(self):
            return layers

        def get_attention_mask(self, batch):
            return batch[1]

    def dataset(examples: Examples):
        return torch.utils.data.TensorDataset(examples.inputs, examples.attention_mask, examples.targets)

    return KronfluenceRunner(model, task=CausalLmTask(), dataset=dataset, copy_model=copy_model)


# ---------------------------------------------------------------- part 1: agreement


def ours_scores(model, fit, train, queries, strategy, damping, batch_size):
    options = InfluenceOptions(strategy=strategy, fisher="empirical", damping=damping, batch_size=batch_size)
    common = dict(loss="causal_lm", method="influence", options=options, fits=[fit])
    pairwise = attribute([model], train, queries, mode="pairwise", measurement="loss", top_k=len(train), **common)
    self_ = attribute([model], train, None, mode="self", **common)
    return pairwise, self_


def agreement(quick: bool) -> tuple[list[str], list[dict], str]:
    setup = TINY
    model = lora_gpt2(setup)
    train = markov_sequences(setup, setup.num_train, seed=1)
    queries = markov_sequences(setup, setup.num_queries, seed=2)
    before, after = finetune(model, train, steps=60 if quick else 300)
    with torch.no_grad():
        query_loss = float(lm_loss(model, queries))
    layers = default_layers(model)
    n, batch = len(train), setup.batch_size
    tokens = float(train.attention_mask.sum()) / n  # real tokens per training sequence
    desc = (
        f"{setup.describe()}; {len(layers)} tracked LoRA linears; fine-tuned ({60 if quick else 300} Adam steps on the "
        f"adapters): training loss per token {before:.3f} -> {after:.3f}, query loss {query_loss:.3f} "
        f"(uniform: {np.log(setup.vocab - 1):.3f})"
    )
    rows, records = [], []
    for strategy in ("ekfac", "kfac", "identity"):
        fit = fit_curvature(
            model, train, "causal_lm", FitOptions(strategy=strategy, fisher="empirical", batch_size=batch)
        )
        runner = kron_runner(model, layers)
        runner.fit(train, strategy=strategy, empirical=True, batch_size=batch)
        pw, sf = ours_scores(model, fit, train, queries, strategy, None, batch)
        dampings = [("each tool's default", None, None)]
        if strategy != "identity":
            explicit = float(statistics.median(pw.diagnostics["models"][0]["damping"].values()))
            dampings.append((f"explicit {explicit:.3g} for both", explicit, explicit))
        if strategy == "kfac":
            # kronfluence's K-FAC gradient factor is a mean over tokens, ours a mean over sequences (the sum over
            # a sequence's tokens): its eigenvalues are ours / (real tokens per sequence), and so must its damping be
            dampings.append(
                (
                    f"explicit {explicit:.3g} (ours), {explicit:.3g} / {tokens:.2f} (kronfluence)",
                    explicit,
                    explicit / tokens,
                )
            )
        for label, ours_d, kron_d in dampings:
            if ours_d is not None:
                pw, sf = ours_scores(model, fit, train, queries, strategy, ours_d, batch)
            kpw = runner.pairwise(train, queries, kron_d, batch_size=batch)
            ksf = runner.self_scores(train, kron_d, batch_size=batch)
            ours_matrix = full_scores(pw, n)
            sp = rowwise_spearman(ours_matrix.numpy(), kpw.numpy())
            self_sp = float(rowwise_spearman(sf.scores.numpy()[None], ksf.numpy()[None])[0])
            rel = float((ours_matrix - kpw).norm() / kpw.norm())
            scale = float((ours_matrix * kpw).sum() / kpw.pow(2).sum())  # least squares: ours ~ scale x kron
            rel_scaled = float((ours_matrix - scale * kpw).norm() / (scale * kpw).norm())
            self_rel = float((sf.scores.float() - ksf).norm() / ksf.norm())
            rows.append(
                f"| {strategy} | {label} | {np.nanmean(sp):.6f} | {np.nanmin(sp):.6f} | {rel:.2e} | {scale:.4g} | "
                f"{rel_scaled:.2e} | "
                f"{self_sp:.6f} | {self_rel:.2e} |"
            )
            records.append(
                {
                    "strategy": strategy,
                    "damping": label,
                    "mean_spearman": float(np.nanmean(sp)),
                    "min_spearman": float(np.nanmin(sp)),
                    "relative_l2": rel,
                    "least_squares_scale": scale,
                    "relative_l2_after_scale": rel_scaled,
                    "self_spearman": self_sp,
                    "self_relative_l2": self_rel,
                }
            )
            print(rows[-1], flush=True)
    return rows, records, desc


# ---------------------------------------------------------------- part 2: cost (one side per subprocess)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def cost_setup(args: argparse.Namespace) -> LmSetup:
    """SMALL (or QUICK_SMALL with --quick), with the sizes given on the command line."""
    setup = QUICK_SMALL if args.quick else SMALL
    changes = {
        "n_layer": args.layers,
        "num_train": args.train,
        "num_queries": args.queries,
        "batch_size": args.batch_size,
        "targets": None if args.targets is None else tuple(args.targets.split(",")),
    }
    return replace(setup, **{k: v for k, v in changes.items() if v is not None})


def cost_side(side: str, setup: LmSetup) -> dict:
    """One side's fit + pairwise on the GPT-2-small-shaped LoRA model; run in a fresh process."""
    set_threads()
    model = lora_gpt2(setup, random_adapters=True)
    for p in model.parameters():  # the engine and kronfluence both take gradients through the hooks only
        p.requires_grad_(False)
    train = random_sequences(setup, setup.num_train, seed=1)
    queries = random_sequences(setup, setup.num_queries, seed=2)
    layers = default_layers(model)
    batch = setup.batch_size
    out: dict = {"side": side, "threads": torch.get_num_threads(), "layers": len(layers)}
    out["adapter_parameters"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["rss_before_mib"] = peak_rss_mib()
    if side == "ours":
        with Timer() as t:
            fit = fit_curvature(
                model, train, "causal_lm", FitOptions(strategy="ekfac", fisher="empirical", batch_size=batch)
            )
        out["fit_s"], out["fit_cpu_s"] = t.seconds, t.cpu_seconds
        out["rss_after_fit_mib"] = peak_rss_mib()
        with Timer() as t:
            pw = attribute(
                [model],
                train,
                queries,
                loss="causal_lm",
                method="influence",
                mode="pairwise",
                measurement="loss",
                top_k=len(train),
                options=InfluenceOptions(strategy="ekfac", fisher="empirical", batch_size=batch),
                fits=[fit],
            )
        scores = full_scores(pw, len(train))
    else:
        runner = kron_runner(model, layers, copy_model=False)
        with Timer() as t:
            runner.fit(train, strategy="ekfac", empirical=True, batch_size=batch)
        out["fit_s"], out["fit_cpu_s"] = t.seconds, t.cpu_seconds
        out["rss_after_fit_mib"] = peak_rss_mib()
        with Timer() as t:
            scores = runner.pairwise(train, queries, None, batch_size=batch)
    out["pairwise_s"], out["pairwise_cpu_s"] = t.seconds, t.cpu_seconds
    out["rss_peak_mib"] = peak_rss_mib()
    out["scores"] = scores.tolist()
    return out


def side_arguments(setup: LmSetup, quick: bool) -> list[str]:
    """The command-line arguments that make a side process build ``setup``."""
    return [
        *(["--quick"] if quick else []),
        *("--layers", str(setup.n_layer), "--train", str(setup.num_train), "--queries", str(setup.num_queries)),
        *("--batch-size", str(setup.batch_size), "--targets", ",".join(setup.targets)),
    ]


def run_side(side: str, argv: list[str]) -> dict:
    command = [sys.executable, "-m", "benchmarks.hf_vs_kronfluence", "--side", side, *argv]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    print(
        f"{side}: fit {result['fit_s']:.1f} s, pairwise {result['pairwise_s']:.1f} s, peak RSS "
        f"{result['rss_peak_mib']:.0f} MiB (process {result['process_s']:.1f} s)",
        flush=True,
    )
    return result


def cost(setup: LmSetup, argv: list[str], repeats: int, first: str) -> tuple[list[str], dict, str]:
    runs: dict[str, list[dict]] = {"ours": [], "kron": []}
    order = ["kron", "ours"] if first == "kron" else ["ours", "kron"]
    for r in range(repeats):
        for side in order if r % 2 == 0 else order[::-1]:
            runs[side].append(run_side(side, argv))
    ours_scores = torch.tensor(runs["ours"][0].pop("scores"))
    kron_scores = torch.tensor(runs["kron"][0].pop("scores"))
    for side in runs.values():
        for run in side:
            run.pop("scores", None)
    sp = rowwise_spearman(ours_scores.numpy(), kron_scores.numpy())

    def agg(side: str, key: str, how) -> float:
        return float(how([run[key] for run in runs[side]]))

    rows = []
    summary: dict = {"runs": runs, "spearman_mean": float(np.nanmean(sp)), "spearman_min": float(np.nanmin(sp))}
    for how_name, how in (("min", min), ("median", statistics.median)):
        for label, keys in (
            ("fit (EK-FAC)", ["fit_s"]),
            ("pairwise", ["pairwise_s"]),
            ("**fit + pairwise**", ["fit_s", "pairwise_s"]),
        ):
            o = how([sum(run[k] for k in keys) for run in runs["ours"]])
            k = how([sum(run[k] for k in keys) for run in runs["kron"]])
            oc = how([sum(run[k.replace("_s", "_cpu_s")] for k in keys) for run in runs["ours"]])
            kc = how([sum(run[k.replace("_s", "_cpu_s")] for k in keys) for run in runs["kron"]])
            rows.append(
                f"| {how_name} | {label} | {o:.1f} | {k:.1f} | **{o / k:.3f}** | {oc:.1f} / {kc:.1f} = {oc / kc:.3f} |"
            )
            summary[f"{how_name}_{'+'.join(keys)}"] = {"ours": o, "kron": k, "ratio": o / k}
    for key, label in (("rss_before_mib", "after building model + data"), ("rss_peak_mib", "**peak (whole run)**")):
        o, k = agg("ours", key, max), agg("kron", key, max)
        rows.append(f"| max | RSS {label} (MiB) | {o:.0f} | {k:.0f} | **{o / k:.3f}** | |")
        summary[key] = {"ours": o, "kron": k, "ratio": o / k}
    o = agg("ours", "rss_peak_mib", max) - agg("ours", "rss_before_mib", max)
    k = agg("kron", "rss_peak_mib", max) - agg("kron", "rss_before_mib", max)
    rows.append(f"| max | RSS peak - RSS after build (MiB) | {o:.0f} | {k:.0f} | **{o / k:.3f}** | |")
    summary["rss_growth_mib"] = {"ours": o, "kron": k, "ratio": o / k}
    first = runs["ours"][0]
    desc = (
        f"{setup.describe()}; {first['parameters'] / 1e6:.1f}M parameters, "
        f"{first['layers']} tracked LoRA linears, {first['adapter_parameters']:,} adapter parameters; "
        f"{first['threads']} torch threads each side. Score agreement of the two runs (default damping): "
        f"mean Spearman {np.nanmean(sp):.6f}, min {np.nanmin(sp):.6f}."
    )
    return rows, summary, desc


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=2, help="cost: runs per side, alternating")
    parser.add_argument("--only", choices=["agreement", "cost"], default=None)
    parser.add_argument("--layers", type=int, default=None, help="cost: GPT-2 layers (default 12)")
    parser.add_argument("--train", type=int, default=None, help="cost: training sequences (default 256)")
    parser.add_argument("--queries", type=int, default=None, help="cost: queries (default 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="cost: batch size of both tools (default 16)")
    parser.add_argument("--targets", default=None, help="cost: LoRA target modules, comma-separated (c_attn,c_proj)")
    parser.add_argument("--tag", default="", help="suffix of the results files")
    parser.add_argument("--first", choices=["ours", "kron"], default="kron", help="cost: the side that runs first")
    parser.add_argument("--side", choices=["ours", "kron"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    setup = cost_setup(args)
    if args.side is not None:
        print(json.dumps(cost_side(args.side, setup)))
        return
    set_threads()
    torch.manual_seed(0)
    body: list[str] = []
    record: dict = {}
    if args.only in (None, "agreement"):
        rows, records, desc = agreement(args.quick)
        record["agreement"] = {"setup": desc, "rows": records}
        body += [
            "## Part 1: agreement on a tiny fine-tuned GPT-2 with LoRA (target: mean Spearman ≥ 0.99)",
            "",
            f"- {desc}",
            "",
            "| strategy | damping | mean Spearman (pairwise, per query) | min Spearman | rel. L2 diff of score "
            "matrices | scale (ours ≈ scale x kron) | rel. L2 diff after that scale | self-influence Spearman | "
            "self-influence rel. L2 diff |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    if args.only in (None, "cost"):
        rows, summary, desc = cost(setup, side_arguments(setup, args.quick), args.repeats, args.first)
        record["cost"] = {"setup": desc, **summary}
        body += [
            f"## Part 2: cost at GPT-2-small width ({args.repeats} run(s) per side, alternating, each a fresh process)",
            "",
            f"- {desc}",
            "- Wall and CPU times in seconds (CPU = the process's CPU time over all threads); peak RSS from "
            "getrusage (ru_maxrss) of each side's process. Ratio = ours / kronfluence (targets: time ≤ 0.5, "
            "memory ≤ 1). The 2 cores are shared with other work, so wall times are noisy.",
            "",
            "| stat | stage | ours | kronfluence | ratio | CPU time ours / kron = ratio |",
            "| --- | --- | --- | --- | --- | --- |",
            *rows,
            "",
        ]
    name = "hf_kronfluence" + ("_quick" if args.quick else "")
    if args.only is not None:
        name += f"_{args.only}"
    if args.tag:
        name += f"_{args.tag}"
    write_result(name, "Hugging Face GPT-2 + LoRA: engine vs kronfluence 1.0.1", "\n".join(body))
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
