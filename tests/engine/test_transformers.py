"""Hugging Face models (GPT-2, Llama, BERT, peft LoRA) against explicit computations, float64, tiny configs
built here with random weights (nothing downloaded).

Ground truth: per-example gradients by autograd on each example run alone and UNPADDED (its loss written
out here, not the engine's loss code), and dense curvature matrices built with torch.func on the tracked
parameters. Every engine run sees padded batches. BERT pools its first position, so its batches are
right-padded only (as its tokenizer does); the causal LMs are checked with both sides.
Tolerance: 2e-7 relative to the largest |score| (scores come back as float32); 1e-6 for sums of
per-token scores. Llama runs with SDPA attention: its eager attention takes the softmax in float32, and
casts float64's mask value to -inf there (NaN rows under left padding).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import peft
import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from worker.attribution import (
    DataInfOptions,
    Examples,
    FitOptions,
    GradientSimilarityOptions,
    InfluenceOptions,
    attribute,
    fit_curvature,
    kept_activities,
)
from worker.attribution.curvature.ekfac import EkfacCurvature
from worker.attribution.gradients import FisherLabels
from worker.attribution.hooks import (
    TrackedLayer,
    default_layers,
    resolve_layers,
    weight_matrix,
)
from worker.attribution.losses import LossName, per_example_loss
from worker.attribution.options import CurvatureKind, InfluenceStrategy
from worker.attribution.progress import StageCounter
from worker.attribution.statistics import Eigenbasis, fit_corrected_eigenvalues, numerical_null_space
from worker.attribution.text import (
    PaddingSide,
    TextBatch,
    per_token_queries,
    position_ids,
)
from worker.attribution.types import AttributionScores

REL = 2e-7  # scores come back as float32
VOCAB = 23
PAD = 0


def gpt2(tie: bool = True, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attn_implementation="sdpa",
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).double().eval()


def gpt2_classifier(seed: int = 0) -> nn.Module:
    """GPT-2 sequence classification: the head runs on every token, the logits of the last real one are used."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=8,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
        num_labels=3,
    )
    return transformers.GPT2ForSequenceClassification(config).double().eval()


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config).double().eval()


def lora_gpt2(seed: int = 0) -> nn.Module:
    base = gpt2(seed=seed)
    torch.manual_seed(seed + 1)
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    return peft.get_peft_model(base, config).double().eval()


def token_lists(n: int, seed: int, shortest: int = 3, longest: int = 6) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(shortest, longest + 1, (n,), generator=generator)
    return [torch.randint(1, VOCAB, (int(k),), generator=generator).tolist() for k in lengths]


# ---------------------------------------------------------------- ground truth


def layer_gradient(layer: TrackedLayer, grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """A layer's parameter gradients in the engine's flat layout (rows of W as y = W x, bias column last)."""
    weight = grads[f"{layer.name}.weight"]
    if layer.kind in ("conv1d", "embedding"):
        weight = weight.T
    if layer.has_bias:
        weight = torch.cat([weight, grads[f"{layer.name}.bias"][:, None]], dim=1)
    return weight.flatten()


def unpadded_loss(model: nn.Module, tokens: list[int], label: int | None, prompt: int = 0) -> torch.Tensor:
    """The example's loss, the model run alone on it without padding: the summed NLL of the tokens after the
    prompt, -sum_{t >= max(prompt, 1)} log p(x_t | x_<t) (causal LM), or the cross-entropy of ``label``."""
    ids = torch.tensor([tokens])
    logits = model(ids).logits
    if label is not None:
        return F.cross_entropy(logits, torch.tensor([label]))
    log_probabilities = torch.log_softmax(logits[0], dim=-1)
    return -torch.stack([log_probabilities[t - 1, tokens[t]] for t in range(max(prompt, 1), len(tokens))]).sum()


def explicit_gradients(
    model: nn.Module,
    layers: list[TrackedLayer],
    tokens: Sequence[list[int]],
    labels: Sequence[int] | None = None,
    prompts: Sequence[int] | None = None,
) -> torch.Tensor:
    """(N, D) per-example gradients of each unpadded example's loss."""
    params = {
        f"{layer.name}.{kind}": getattr(layer.module, kind)
        for layer in layers
        for kind in ("weight", "bias")
        if getattr(layer.module, kind, None) is not None
    }
    rows = []
    for i, sequence in enumerate(tokens):
        loss = unpadded_loss(
            model, sequence, None if labels is None else labels[i], 0 if prompts is None else prompts[i]
        )
        values = torch.autograd.grad(loss, list(params.values()))
        grads = dict(zip(params, values, strict=True))
        rows.append(torch.cat([layer_gradient(layer, grads) for layer in layers]))
    return torch.stack(rows)


def full_matrix(result: AttributionScores, n_queries: int, n_train: int) -> torch.Tensor:
    assert result.topk is not None
    return torch.zeros(n_queries, n_train, dtype=torch.float64).scatter_(
        1, result.topk.positive_indices, result.topk.positive_scores.double()
    )


def close(got: torch.Tensor, expected: torch.Tensor, rel: float = REL) -> bool:
    return float((got - expected).abs().max()) <= rel * float(expected.abs().max())


# ---------------------------------------------------------------- the batch contract and the LM loss


def test_padded_batches_and_lm_loss_definition() -> None:
    model = gpt2()
    tokens = [[5, 6, 7, 8], [9, 10]]
    for side in ("right", "left"):
        batch = TextBatch.padded(tokens, PAD, side=side, prompt_lengths=[2, 1], length=6)
        examples = batch.examples()
        assert examples.attention_mask is not None and examples.attention_mask.sum(1).tolist() == [4, 2]
        assert ((examples.targets != -100).sum(1)).tolist() == [2, 1]  # the completion only
        logits = model(
            examples.inputs, attention_mask=examples.attention_mask, position_ids=position_ids(examples.attention_mask)
        ).logits
        losses = per_example_loss(logits, examples.targets, "causal_lm")
        expected = torch.stack([unpadded_loss(model, t, None, p) for t, p in zip(tokens, [2, 1], strict=True)])
        assert torch.allclose(losses, expected, rtol=1e-10, atol=0)


def test_conv1d_is_the_linear_on_the_transposed_weight() -> None:
    torch.manual_seed(0)
    conv = Conv1D(4, 5).double()  # nf=4 outputs, nx=5 inputs
    nn.init.normal_(conv.bias)
    linear = nn.Linear(5, 4).double()
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    conv_model = nn.Sequential(conv, nn.Tanh(), nn.Linear(4, 3).double())
    linear_model = nn.Sequential(linear, nn.Tanh(), nn.Linear(4, 3).double())
    linear_model[2].load_state_dict(conv_model[2].state_dict())
    (conv_layer,), (linear_layer,) = resolve_layers(conv_model, ["0"]), resolve_layers(linear_model, ["0"])
    assert conv_layer.kind == "conv1d" and (conv_layer.in_features, conv_layer.out_features) == (6, 4)
    assert torch.equal(weight_matrix(conv_layer), weight_matrix(linear_layer))
    generator = torch.Generator().manual_seed(1)
    train = Examples(
        torch.randn(20, 3, 5, generator=generator, dtype=torch.float64).mean(1),
        torch.randint(0, 3, (20,), generator=generator),
    )
    queries = Examples(torch.randn(4, 5, generator=generator, dtype=torch.float64), torch.tensor([0, 1, 2, 0]))
    results = [
        attribute(
            [m],
            train,
            queries,
            loss="cross_entropy",
            method="influence",
            mode="pairwise",
            top_k=20,
            options=InfluenceOptions(strategy="ekfac", batch_size=7),
        )
        for m in (conv_model, linear_model)
    ]
    assert close(full_matrix(results[0], 4, 20), full_matrix(results[1], 4, 20), rel=1e-10)


# ---------------------------------------------------------------- gradients (identity curvature)


@pytest.mark.parametrize("side", ["right", "left"])
def test_gpt2_gradient_dot_products_equal_unpadded_autograd(side: PaddingSide) -> None:
    model = gpt2(tie=False)
    train, queries = token_lists(6, 1), token_lists(3, 2)
    prompts = [1, 2, 2]
    layers = [
        "transformer.wte",
        "transformer.wpe",
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.mlp.c_proj",
        "lm_head",
    ]
    tracked = resolve_layers(model, layers)
    assert [t.kind for t in tracked] == ["embedding", "embedding", "conv1d", "conv1d", "linear"]
    expected = (
        explicit_gradients(model, tracked, queries, prompts=prompts) @ explicit_gradients(model, tracked, train).T
    )
    train_batch = TextBatch.padded(train, PAD, side=side, length=8).examples()
    query_batch = TextBatch.padded(queries, PAD, side=side, prompt_lengths=prompts).examples()
    result = attribute(
        [model],
        train_batch,
        query_batch,
        loss="causal_lm",
        method="gradient_similarity",
        mode="pairwise",
        top_k=6,
        options=GradientSimilarityOptions(layers=layers, batch_size=4),
    )
    assert close(full_matrix(result, 3, 6), expected)


def test_default_layers_leave_out_the_lm_head_and_track_only_lora() -> None:
    model = gpt2()
    assert "lm_head" not in default_layers(model)
    assert "transformer.h.0.attn.c_attn" in default_layers(model)
    adapted = lora_gpt2()
    names = default_layers(adapted)
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 4  # lora_A and lora_B of c_attn and c_fc
    # a classifier adapter also trains a full copy of the head (peft's modules_to_save): tracked with the adapters
    classifier = peft.get_peft_model(
        bert(), peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"])
    )
    trained = {n.rsplit(".", 1)[0] for n, p in classifier.named_parameters() if p.requires_grad}
    assert set(default_layers(classifier)) == trained and any("modules_to_save" in n for n in trained)


def test_adapter_only_attribution_equals_full_gradients_restricted_to_the_adapters() -> None:
    model = lora_gpt2()
    train, queries = token_lists(5, 3), token_lists(2, 4)
    every = [n for n, p in model.named_parameters() if p.requires_grad]
    assert every and all("lora_" in n for n in every)
    # the full gradient of every trainable parameter, restricted to the adapters' in the engine layout
    tracked = resolve_layers(model, None)
    expected = explicit_gradients(model, tracked, queries) @ explicit_gradients(model, tracked, train).T
    result = attribute(
        [model],
        TextBatch.padded(train, PAD).examples(),
        TextBatch.padded(queries, PAD, "left").examples(),
        loss="causal_lm",
        method="gradient_similarity",
        mode="pairwise",
        top_k=5,
        options=GradientSimilarityOptions(batch_size=2),
    )
    assert close(full_matrix(result, 2, 5), expected)


# ---------------------------------------------------------------- DataInf on LoRA


@pytest.mark.parametrize("kept", ["memory", "files", "recomputed"])
def test_datainf_on_lora_matches_its_formula(kept: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the first pass's activities kept (sequence layers as their per-example gradient matrices) in memory,
    kept in mapped temporary files (as when they are large), and not kept (every pass runs the model)."""
    keep_activities = kept != "recomputed"
    if kept == "files":
        monkeypatch.setattr(kept_activities, "SPILL_BYTES", 0)
    model = lora_gpt2(seed=5)
    train, queries = token_lists(6, 6), token_lists(2, 7)
    tracked = resolve_layers(model, None)
    g_train, g_query = explicit_gradients(model, tracked, train), explicit_gradients(model, tracked, queries)
    n = len(train)
    expected = torch.zeros(2, n, dtype=torch.float64)
    offset = 0
    for layer in tracked:
        d = layer.num_parameters
        g, v = g_train[:, offset : offset + d], g_query[:, offset : offset + d]
        offset += d
        lam = 0.1 * float(g.pow(2).sum(1).mean()) / d
        norms = g.pow(2).sum(1)
        for q in range(2):
            for i in range(n):
                correction = (
                    sum(float(g[j] @ v[q]) * float(g[j] @ g[i]) / (lam + float(norms[j])) for j in range(n)) / n
                )
                expected[q, i] += (float(v[q] @ g[i]) - correction) / lam
    result = attribute(
        [model],
        TextBatch.padded(train, PAD, length=7).examples(),
        TextBatch.padded(queries, PAD).examples(),
        loss="causal_lm",
        method="datainf",
        mode="pairwise",
        top_k=n,
        options=DataInfOptions(batch_size=4, memory_budget_bytes=2**30 if keep_activities else 0),
    )
    assert close(full_matrix(result, 2, n), expected)
    used = result.diagnostics["models"][0]
    assert used["cached_training_activities"] is keep_activities
    assert used["cached_activities_spilled"] is (kept == "files")
    assert used["training_passes"] == (0 if keep_activities else 1)  # passes of the preconditioner


# ---------------------------------------------------------------- curvature against dense matrices


def flat_theta(tracked: list[TrackedLayer]) -> torch.Tensor:
    return torch.cat([weight_matrix(layer).flatten() for layer in tracked])


def params_from_flat(tracked: list[TrackedLayer], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    params, offset = {}, 0
    for layer in tracked:
        matrix = flat[offset : offset + layer.num_parameters].reshape(layer.out_features, layer.in_features)
        offset += layer.num_parameters
        columns = layer.in_features - int(layer.has_bias)
        weight = matrix[:, :columns]
        params[f"{layer.name}.weight"] = weight.T if layer.kind in ("conv1d", "embedding") else weight
        if layer.has_bias:
            params[f"{layer.name}.bias"] = matrix[:, columns]
    return params


def dense_gauss_newton(model: nn.Module, tracked: list[TrackedLayer], tokens: Sequence[list[int]]) -> torch.Tensor:
    """(1/N) sum_i J_i^T H_i J_i of the summed next-token NLL, each example unpadded (torch.func.jacrev)."""
    theta = flat_theta(tracked)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for sequence in tokens:
        ids = torch.tensor([sequence])

        def logits(flat: torch.Tensor, ids: torch.Tensor = ids) -> torch.Tensor:
            return functional_call(model, params_from_flat(tracked, flat), (ids,), tie_weights=False).logits[0, :-1]

        jacobian = torch.func.jacrev(logits)(theta)  # (T-1, V, D)
        p = torch.softmax(logits(theta).detach(), -1)
        for t in range(jacobian.shape[0]):
            h = torch.diag(p[t]) - torch.outer(p[t], p[t])
            total += jacobian[t].T @ h @ jacobian[t]
    return total / len(tokens)


def dense_hessian(model: nn.Module, tracked: list[TrackedLayer], tokens: Sequence[list[int]]) -> torch.Tensor:
    theta = flat_theta(tracked)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        total = flat.new_zeros(())
        for sequence in tokens:
            ids = torch.tensor([sequence])
            out = functional_call(model, params_from_flat(tracked, flat), (ids,), tie_weights=False).logits
            total = total + F.cross_entropy(out[0, :-1], ids[0, 1:], reduction="sum")
        return total / len(tokens)

    return torch.func.hessian(mean_loss)(theta)


@pytest.mark.parametrize(
    ("strategy", "curvature"), [("exact", "gauss_newton"), ("cg", "gauss_newton"), ("exact", "hessian")]
)
def test_exact_influence_equals_dense_solve(strategy: InfluenceStrategy, curvature: CurvatureKind) -> None:
    model = gpt2(tie=False, seed=3)  # a tied LM head's autograd gradient would include the embedding's use
    layers = ["transformer.h.0.mlp.c_fc" if curvature == "gauss_newton" else "transformer.h.0.attn.c_proj", "lm_head"]
    tracked = resolve_layers(model, layers)
    train, queries = token_lists(5, 8), token_lists(2, 9)
    dense = (dense_gauss_newton if curvature == "gauss_newton" else dense_hessian)(model, tracked, train).detach()
    eigenvalues = torch.linalg.eigvalsh(dense.detach())
    damping = 0.1 * float(eigenvalues.abs().max()) + 2 * max(
        0.0, -float(eigenvalues.min())
    )  # the Hessian is indefinite
    solved = torch.linalg.solve(
        dense + damping * torch.eye(dense.shape[0], dtype=torch.float64), explicit_gradients(model, tracked, train).T
    )
    expected = explicit_gradients(model, tracked, queries) @ solved
    result = attribute(
        [model],
        TextBatch.padded(train, PAD, "left").examples(),
        TextBatch.padded(queries, PAD).examples(),
        loss="causal_lm",
        method="influence",
        mode="pairwise",
        top_k=5,
        options=InfluenceOptions(
            strategy=strategy,
            curvature=curvature,
            damping=damping,
            layers=layers,
            batch_size=3,
            tol=1e-12,
            max_iter=500,
        ),
    )
    assert close(full_matrix(result, 2, 5), expected)


@pytest.mark.parametrize("strategy", ["kfac", "ekfac"])
def test_kfac_and_ekfac_are_exact_for_one_example_on_the_classifier_head(strategy: InfluenceStrategy) -> None:
    """One training example, empirical Fisher, a rank-one Linear (BERT's classifier on the pooled output):
    S (x) A = vec(G) vec(G)^T exactly, so both equal the dense (G G^T + delta I)^-1."""
    model = bert(seed=2)
    layers = ["classifier"]
    tracked = resolve_layers(model, layers)
    train, queries = token_lists(1, 10), token_lists(3, 11)
    g_train = explicit_gradients(model, tracked, train, labels=[1])
    g_query = explicit_gradients(model, tracked, queries, labels=[0, 2, 1])
    damping = 0.3
    curvature = g_train.T @ g_train
    expected = g_query @ torch.linalg.solve(
        curvature + damping * torch.eye(curvature.shape[0], dtype=torch.float64), g_train.T
    )
    result = attribute(
        [model],
        TextBatch.padded(train, PAD, length=8, classes=[1]).examples(),
        TextBatch.padded(queries, PAD, length=9, classes=[0, 2, 1]).examples(),
        loss="cross_entropy",
        method="influence",
        mode="pairwise",
        top_k=1,
        options=InfluenceOptions(strategy=strategy, fisher="empirical", damping=damping, layers=layers),
    )
    assert close(full_matrix(result, 3, 1), expected)


# ---------------------------------------------------------------- padding invariance


def _scores(
    model: nn.Module,
    batch: Callable[[PaddingSide, int], Examples],
    queries: Examples,
    loss: LossName,
    side: PaddingSide,
    length: int,
    options: InfluenceOptions,
) -> torch.Tensor:
    result = attribute(
        [model], batch(side, length), queries, loss=loss, method="influence", mode="pairwise", top_k=6, options=options
    )
    return full_matrix(result, len(queries), 6)


PADDING_CASES = [("gpt2", 0), ("llama", 0), ("bert", 0)] + [("gpt2_classifier", seed) for seed in (0, 1, 3, 8)]


@pytest.mark.parametrize(("family", "seed"), PADDING_CASES)
def test_scores_do_not_depend_on_padding(family: str, seed: int) -> None:
    """The same examples padded to two lengths, right and left: the same EK-FAC (true Fisher) scores.
    gpt2_classifier runs with several label seeds: its factors are rank-deficient (6 examples; in a one-layer
    model the MLP's output gradients live at the last real token only), and before the null spaces were pooled
    (``statistics.pool_null_spaces``) float noise from the padding moved its scores by 1e-5..1e-2 for seeds
    0..3, 7 and 8."""
    train, queries = token_lists(6, 12), token_lists(2, 13)
    classifier = family in ("bert", "gpt2_classifier")
    loss: LossName = "cross_entropy" if classifier else "causal_lm"
    classes, query_classes = ([0, 1, 2, 1, 0, 2], [2, 0]) if classifier else (None, None)
    model = MODELS[family](seed=4)

    def batch(side: PaddingSide, length: int) -> Examples:
        return TextBatch.padded(train, PAD, side=side, length=length, classes=classes).examples()

    query_batch = TextBatch.padded(
        queries, PAD, classes=query_classes, prompt_lengths=None if classes else [1, 2]
    ).examples()
    options = InfluenceOptions(strategy="ekfac", batch_size=4, fisher_samples=2, seed=seed)
    reference = _scores(model, batch, query_batch, loss, "right", 6, options)
    assert float(reference.abs().max()) > 0
    paddings: list[tuple[PaddingSide, int]] = [("right", 9)]
    if family != "bert":
        paddings += [("left", 6), ("left", 10)]
    for side, length in paddings:
        assert close(_scores(model, batch, query_batch, loss, side, length, options), reference)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "gpt2_classifier": gpt2_classifier,
}


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 8])
def test_ekfac_scores_do_not_move_with_float_noise(seed: int) -> None:
    """Float noise of the kind padding, thread counts or BLAS kernels make (the weights moved by 1e-14 relative)
    leaves EK-FAC's scores where they were, also with rank-deficient factors (the label seeds that failed the
    padding test before the null spaces were pooled; unpooled, these moved by 7e-5..7e-3)."""
    model = gpt2_classifier(seed=4)
    noisy = gpt2_classifier(seed=4)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.mul_(1 + 1e-14 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    train = TextBatch.padded(token_lists(6, 12), PAD, classes=[0, 1, 2, 1, 0, 2]).examples()
    queries = TextBatch.padded(token_lists(2, 13), PAD, classes=[2, 0]).examples()
    options = InfluenceOptions(strategy="ekfac", batch_size=4, fisher_samples=2, seed=seed)
    scores = [
        full_matrix(
            attribute(
                [m], train, queries, loss="cross_entropy", method="influence", mode="pairwise", top_k=6, options=options
            ),
            2,
            6,
        )
        for m in (model, noisy)
    ]
    assert float(scores[0].abs().max()) > 0
    assert close(scores[1], scores[0])


def test_ekfac_preconditioner_does_not_depend_on_the_null_space_basis() -> None:
    """Another orthonormal basis of each factor's null space (what float noise makes ``eigh`` pick), with the
    corrected eigenvalues refitted in it on the same labels: the same preconditioner."""
    model = gpt2_classifier(seed=4)
    train = TextBatch.padded(token_lists(6, 12), PAD, classes=[0, 1, 2, 1, 0, 2]).examples()
    options = FitOptions(strategy="ekfac", batch_size=4, fisher_samples=2, seed=1)
    fit = fit_curvature(model, train, "cross_entropy", options)
    assert isinstance(fit, EkfacCurvature)
    generator = torch.Generator().manual_seed(0)
    rotated: dict[str, Eigenbasis] = {}
    nulls = 0
    for name, basis in fit.bases.items():
        turned = []
        for values, q in (
            (basis.activation_eigenvalues, basis.activation_eigenvectors),
            (basis.gradient_eigenvalues, basis.gradient_eigenvectors),
        ):
            null = numerical_null_space(values, torch.float64)
            k = int(null.sum())
            nulls += max(k - 1, 0)
            turn = torch.linalg.qr(torch.randn(k, k, generator=generator, dtype=torch.float64))[0]
            q = q.clone()
            q[:, null] = q[:, null] @ turn
            turned.append(q)
        rotated[name] = Eigenbasis(basis.activation_eigenvalues, turned[0], basis.gradient_eigenvalues, turned[1])
    assert nulls > 0  # the fit has null spaces of dimension > 1 to turn
    layers = resolve_layers(model, fit.layer_names)
    counter = StageCounter(None, "fit", 0)
    labels = FisherLabels(options.fisher, options.fisher_samples, options.seed).for_eigenvalues()
    refitted = fit_corrected_eigenvalues(
        model, layers, train, "cross_entropy", labels, rotated, 4, torch.device("cpu"), counter
    )
    other = EkfacCurvature(fit.layer_names, options, rotated, refitted)
    first = fit.preconditioner(None, dtype=torch.float64)
    second = other.preconditioner(None, dtype=torch.float64)
    for layer in layers:
        vectors = torch.randn(3, layer.out_features, layer.in_features, generator=generator, dtype=torch.float64)
        expected = first.precondition_layer(layer.name, vectors)
        assert close(second.precondition_layer(layer.name, vectors), expected, rel=1e-10), layer.name


def test_per_token_query_scores_sum_to_the_query_score() -> None:
    model = gpt2(seed=6)
    train = TextBatch.padded(token_lists(5, 14), PAD).examples()
    queries = TextBatch.padded(token_lists(2, 15), PAD, "left", prompt_lengths=[1, 2]).examples()
    tokens = per_token_queries(queries)
    assert tokens.query.tolist() == [q for q in range(2) for _ in range(int((queries.targets[q] != -100).sum()))]
    options = InfluenceOptions(strategy="ekfac", batch_size=3)
    whole = attribute(
        [model], train, queries, loss="causal_lm", method="influence", mode="pairwise", top_k=5, options=options
    )
    split = attribute(
        [model], train, tokens.examples, loss="causal_lm", method="influence", mode="pairwise", top_k=5, options=options
    )
    per_token = full_matrix(split, len(tokens.query), 5)
    summed = torch.zeros(2, 5, dtype=torch.float64).index_add_(0, tokens.query, per_token)
    assert close(summed, full_matrix(whole, 2, 5), rel=1e-6)
