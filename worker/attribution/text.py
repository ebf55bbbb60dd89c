"""Token datasets and Hugging Face models: the engine's contract for language models and text classifiers.

How the worker calls the engine with a Hugging Face model (built and loaded by the service, any
``transformers`` causal LM or sequence classifier, optionally wrapped by ``peft``):

1. Tokenize (without the engine) and build a ``TextBatch`` per dataset: ``TextBatch.padded(...)`` pads
   token lists (right or left), sets labels -100 at padding and, for causal LM examples with a prompt,
   at the prompt tokens (only the completion is scored). ``TextBatch(...)`` takes tensors directly.
2. ``batch.examples()`` gives the engine's ``Examples`` (token ids as ``inputs``, ``attention_mask``,
   labels as ``targets``, optional ``weights``).
3. Call the usual entry points (``attribute``, ``fit_curvature``) with the model itself and
   ``loss="causal_lm"`` (causal LM: the summed next-token NLL of the scored tokens) or
   ``loss="cross_entropy"`` (sequence classification, with ``measurement`` "loss" or "margin").
   Layers are named by the model's own module names (``model.named_modules()``); ``layers=None``
   tracks ``hooks.default_layers(model)``: every Linear / Conv1D, but only the LoRA ``lora_A`` /
   ``lora_B`` linears of a peft model, and never the LM head unless named. Name ``nn.Embedding``
   layers explicitly to track them.

The engine runs a token model as ``model(input_ids, attention_mask=mask, position_ids=positions)``
(``run_text_model``), with positions counted over real tokens only, so left and right padding give
the same outputs at real tokens; it reads ``logits`` from the returned ``ModelOutput``. Padded
positions contribute nothing to any statistic or gradient (see ``hooks.ActivityRecorder.clear``).
``per_token_queries`` gives per-token query attribution (each scored query token separately).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from worker.attribution.types import AttributionError, Examples

PaddingSide = Literal["right", "left"]
IGNORE_INDEX = -100  # a label that is not scored (Hugging Face's convention)


@dataclass(frozen=True)
class TextBatch:
    """Token examples: ``input_ids`` int64 (N, T); ``attention_mask`` (N, T), 1 = real token, 0 = padding;
    ``labels``: int64 (N, T) next-token labels aligned with ``input_ids`` for causal LM (-100 = not
    scored; the engine shifts them), or int64 (N,) classes for sequence classification;
    ``weights`` float (N,) multiplies each example's loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.dtype.is_floating_point:
            raise AttributionError(
                f"input_ids must be integer token ids (N, T), got {self.input_ids.dtype} {tuple(self.input_ids.shape)}"
            )
        if self.attention_mask.shape != self.input_ids.shape:
            raise AttributionError(
                f"attention_mask must have the shape of input_ids {tuple(self.input_ids.shape)}, "
                f"got {tuple(self.attention_mask.shape)}"
            )
        if self.labels.shape not in (self.input_ids.shape, self.input_ids.shape[:1]):
            raise AttributionError(
                f"labels must be (N, T) token labels or (N,) classes, got {tuple(self.labels.shape)}"
            )
        if self.weights is not None and self.weights.shape != self.input_ids.shape[:1]:
            raise AttributionError(f"weights must have shape ({self.input_ids.shape[0]},)")

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def examples(self) -> Examples:
        """The engine's ``Examples``. Token labels are set to -100 at padding and where the position before
        is padding or absent (a sequence's first token has no context: with left padding, the logits of the
        last pad position would otherwise be scored)."""
        labels = self.labels.long()
        if labels.dim() == 2:
            real = self.attention_mask != 0
            previous = torch.zeros_like(real)
            previous[:, 1:] = real[:, :-1]
            labels = labels.masked_fill(~(real & previous), IGNORE_INDEX)
        return Examples(
            inputs=self.input_ids.long(),
            targets=labels,
            weights=self.weights,
            attention_mask=self.attention_mask.long(),
        )

    @staticmethod
    def padded(
        tokens: Sequence[Sequence[int]],
        pad_token_id: int,
        side: PaddingSide = "right",
        prompt_lengths: Sequence[int] | None = None,
        classes: Sequence[int] | None = None,
        length: int | None = None,
        weights: torch.Tensor | None = None,
    ) -> TextBatch:
        """Pads token lists to ``length`` (default: the longest) on ``side``.

        Causal LM (``classes`` None): labels are the tokens, -100 at padding and at the first
        ``prompt_lengths[i]`` tokens (the prompt: only the completion is scored). Classification:
        labels are ``classes``.
        """
        if not tokens:
            raise AttributionError("no token sequence to pad")
        width = max(len(t) for t in tokens) if length is None else length
        if any(len(t) > width or len(t) == 0 for t in tokens):
            raise AttributionError(f"every token sequence must have 1 to {width} tokens")
        ids = torch.full((len(tokens), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(tokens), width), dtype=torch.long)
        labels = torch.full((len(tokens), width), IGNORE_INDEX, dtype=torch.long)
        for row, sequence in enumerate(tokens):
            start = 0 if side == "right" else width - len(sequence)
            span = slice(start, start + len(sequence))
            ids[row, span] = torch.tensor(list(sequence), dtype=torch.long)
            mask[row, span] = 1
            labels[row, span] = ids[row, span]
            if prompt_lengths is not None:
                labels[row, start : start + prompt_lengths[row]] = IGNORE_INDEX
        if classes is not None:
            return TextBatch(ids, mask, torch.tensor(list(classes), dtype=torch.long), weights)
        return TextBatch(ids, mask, labels, weights)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (0 for the padding before the first one), as ``generate`` does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def text_model_kwargs(attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The keyword arguments a token model is called with besides the token ids (Hugging Face convention)."""
    return {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}


def run_text_model(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
    """Runs a token model (Hugging Face convention); returns what the model returns (a tensor or ``ModelOutput``)."""
    return model(input_ids, **text_model_kwargs(attention_mask))


@dataclass(frozen=True)
class TokenQueries:
    """Per-token causal LM queries: row r of ``examples`` is query ``query[r]`` with only the token at
    ``position[r]`` scored (its label kept, every other label -100)."""

    examples: Examples
    query: torch.Tensor  # int64 (R,): the query row in the original queries
    position: torch.Tensor  # int64 (R,): the scored token's position in that row


def per_token_queries(queries: Examples) -> TokenQueries:
    """One query row per scored token of causal LM ``queries`` (labels (N, T), -100 = not scored).

    Attributing the returned ``examples`` (loss ``causal_lm``, measurement ``loss``) scores each token's
    negative log-likelihood separately; as gradients are linear, a query's per-token scores sum to its
    whole score. Costs one query row (forward and backward) per scored token.
    """
    labels = queries.targets
    if labels.dim() != 2:
        raise AttributionError(f"per-token queries need causal LM labels (N, T), got {tuple(labels.shape)}")
    rows, positions = (labels != IGNORE_INDEX).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise AttributionError("the queries have no scored token (every label is -100)")
    single = torch.full((rows.numel(), labels.shape[1]), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    single[torch.arange(rows.numel(), device=labels.device), positions] = labels[rows, positions]
    mask = None if queries.attention_mask is None else queries.attention_mask[rows]
    examples = Examples(inputs=queries.inputs[rows], targets=single, attention_mask=mask)
    return TokenQueries(examples, rows, positions)
