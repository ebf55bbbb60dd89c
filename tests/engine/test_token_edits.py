"""Edits of token models (padded causal LM batches, a peft LoRA GPT-2): the proximal objective's gradient and
Gauss-Newton products against dense computations on each unpadded sequence, float64."""

from __future__ import annotations

import torch

from tests.engine.test_transformers import (
    PAD,
    close,
    dense_gauss_newton,
    explicit_gradients,
    lora_gpt2,
    token_lists,
)
from worker.attribution import EditOptions, edit_parameters
from worker.attribution.hooks import resolve_layers
from worker.attribution.proximal import ProximalObjective, flat_parameters
from worker.attribution.text import TextBatch


def test_token_objective_gradient_and_curvature_equal_dense_ones() -> None:
    model = lora_gpt2(seed=7)
    tracked = resolve_layers(model, None)  # the adapter's lora_A / lora_B linears
    tokens = token_lists(5, 11)
    removed = [1, 3]
    kept = [sequence for i, sequence in enumerate(tokens) if i not in removed]
    train = TextBatch.padded(tokens, PAD, length=8).examples()  # right-padded past the longest sequence
    objective = ProximalObjective(model, tracked, train, torch.tensor(removed), "causal_lm", batch_size=2)
    gradients = explicit_gradients(model, tracked, tokens)  # (N, D) of each unpadded sequence's summed NLL
    n = len(tokens)
    assert close(objective.removal_gradient, gradients[removed].sum(0) / n, rel=1e-10)
    assert close(objective.anchor, gradients.sum(0) / n, rel=1e-10)
    dense = dense_gauss_newton(model, tracked, kept) * len(kept) / n  # G_{-S} = (1/N) Σ_{i∉S} J_iᵀ H_i J_i
    vector = torch.randn(objective.theta0.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert close(objective.curvature_product(objective.theta0, vector), dense @ vector, rel=1e-10)


def test_token_edit_moves_only_the_adapter_and_removing_nothing_is_the_identity() -> None:
    model = lora_gpt2(seed=8)
    train = TextBatch.padded(token_lists(6, 12), PAD).examples()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unchanged = edit_parameters(model, train, torch.tensor([], dtype=torch.long), loss="causal_lm", method="datainf")
    assert all(torch.equal(unchanged.state[k], before[k]) for k in before)
    result = edit_parameters(
        model, train, torch.tensor([0, 4]), loss="causal_lm", method="datainf", edit=EditOptions(estimator="newton")
    )
    changed = {k for k in before if not torch.equal(result.state[k], before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert result.diagnostics["remaining_loss_after"] <= result.diagnostics["remaining_loss_before"]
    theta = flat_parameters(resolve_layers(model, None))
    assert torch.equal(theta, flat_parameters(resolve_layers(model, None)))  # the model itself is left as it was
