"""The L2 penalty a trained model's own gradient shows, on the models of benchmarks/edits_retraining.py.

A model trained to a stationary point of (1/N) Σ ℓ_i(θ) + (δ/2)‖θ‖² has a data-loss gradient g₀ = −δ θ₀. Read
off the tracked layers at the trained weights, δ̂ = −⟨g₀, θ₀⟩ / ‖θ₀‖² estimates δ, and the cosine between g₀ and
−θ₀ says how well the gradient is explained by such a penalty (1: exactly; near 0: not at all). With λ = δ the
edits' proximal objective J_S equals that penalised retrain objective (worker/attribution/proximal.py). The table
compares δ̂ and the cosine with the default proximity λ (0.5 × the mean Gauss-Newton eigenvalue), for the
benchmark's recipe (L2 1e-3) and for the same models trained without a penalty or for fewer epochs.

    python -m benchmarks.implied_weight_decay     # writes results/implied_weight_decay.md (about a minute)
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.common import RESULTS, digits_split, set_threads
from benchmarks.edits_retraining import Setting, reference_eigenvalue, train
from worker.attribution import Examples
from worker.attribution.hooks import evaluation_mode, resolve_layers
from worker.attribution.options import DEFAULT_PROXIMITY_FRACTION
from worker.attribution.proximal import ProximalObjective

# (model, epochs, L2 penalty): the benchmark's recipe for each model, then the same models without the penalty,
# trained for fewer epochs, or with a stronger penalty
RECIPES = [
    ("mlp", 300, 1e-3),
    ("cnn", 150, 1e-3),
    ("mlp_narrow", 300, 1e-3),
    ("cnn_wide", 150, 1e-3),
    ("mlp", 300, 0.0),
    ("cnn", 150, 0.0),
    ("mlp", 30, 1e-3),
    ("mlp", 1000, 1e-3),
    ("mlp", 300, 1e-2),
]
SEEDS = 3


def reading(model: torch.nn.Module, data: Examples) -> tuple[float, float, float]:
    """(δ̂, cosine of g₀ and −θ₀, the default λ) over the model's tracked layers at its weights."""
    layers = resolve_layers(model, None)
    nothing = torch.zeros(0, dtype=torch.long)
    with evaluation_mode(model):
        objective = ProximalObjective(model, layers, data, nothing, "cross_entropy", 2048, linearised=False)
    decay, cosine = objective.implied_weight_decay  # what an edit reads
    return decay, cosine, DEFAULT_PROXIMITY_FRACTION * reference_eigenvalue(model, layers, data)


def main() -> None:
    set_threads(2)
    train_data, _ = digits_split(num_queries=397)
    everything = torch.arange(len(train_data))
    lines = [
        "# The L2 penalty a trained model's gradient shows (digits)",
        "",
        f"Command: `python -m benchmarks.implied_weight_decay`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"torch {torch.__version__}, CPU. δ̂ = −⟨g₀, θ₀⟩/‖θ₀‖² and cos(g₀, −θ₀) over the tracked layers "
        "(g₀: the mean data-loss gradient over the 1,400 training rows), the default edit λ beside them; "
        f"{SEEDS} seeds each (min – max).",
        "",
        "| model | epochs | L2 penalty δ | δ̂ | cos(g₀, −θ₀) | default λ (0.5 × mean GN eigenvalue) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arch, epochs, decay in RECIPES:
        setting = Setting(arch, queries=0, seeds=SEEDS, epochs=epochs, weight_decay=decay)
        values = [reading(train(arch, train_data, everything, seed, setting), train_data) for seed in range(SEEDS)]
        decays, cosines, defaults = zip(*values, strict=True)
        lines.append(
            f"| {arch} | {epochs} | {decay:g} | {min(decays):.2e} – {max(decays):.2e} | "
            f"{min(cosines):.3f} – {max(cosines):.3f} | {min(defaults):.2e} – {max(defaults):.2e} |"
        )
        print(lines[-1], file=sys.stderr, flush=True)
    (RESULTS / "implied_weight_decay.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
