"""Max-pooling in the channels-last layout during the engine's forward-only passes on the CPU.

PyTorch's CPU kernel for ``max_pool2d`` on a contiguous (N, C, H, W) tensor is several times slower than on the
same values stored channels-last (N, H, W, C): at the edits benchmark's CNN shape (1,300 rows, 16 channels, 8×8)
4.3 ms against 1.0 ms including both layout copies (``benchmarks/pooling_layout.py``). An edit's line search
evaluates the remaining rows' loss with forward passes only, seven to nine of them on that CNN, and there that
kernel was a quarter of the edit's time.

``channels_last_max_pooling(layers)`` wraps the given ``nn.MaxPool2d`` layers (``max_pooling_layers(model)``,
found once per model) for the duration of a ``with`` block: a forward pre-hook copies a 4-D input to channels-last, and a forward hook copies the pooled output back
to the contiguous layout. The values are identical (the same windows, the same maxima); the layer's output has
the layout it has without the hooks, so a model that calls ``.view`` on it runs as before. The hooks act only
where gradients are off and the tensor lies on the CPU: the backward pass of the channels-last kernel, with the
gradient's layout copy, costs more than the plain one's, and the GPU's kernels do not need it; and only on inputs
of at least MIN_CHANNELS channels (with two or three, the copies cost more than the kernel saves). Pooling written
as ``F.max_pool2d`` inside a model's ``forward`` is not a module and keeps its layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

MIN_CHANNELS = 4  # fewer channels: the channels-last kernel gains less than its layout copies cost (the benchmark)


def _applies(tensor: object) -> bool:
    """Whether the hooks change this tensor's layout: a 4-D CPU tensor of MIN_CHANNELS channels or more,
    contiguous, with gradients off."""
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.dim() == 4
        and tensor.shape[1] >= MIN_CHANNELS
        and tensor.device.type == "cpu"
        and not torch.is_grad_enabled()
        and tensor.is_contiguous()
    )


def _to_channels_last(module: nn.Module, inputs: tuple[object, ...]) -> tuple[object, ...] | None:
    if not inputs or not _applies(inputs[0]):
        return None
    first = inputs[0]
    assert isinstance(first, torch.Tensor)
    return (first.contiguous(memory_format=torch.channels_last), *inputs[1:])


def _to_contiguous(module: nn.Module, inputs: tuple[object, ...], output: object) -> object | None:
    """The pooled output (with ``return_indices``, the output and its indices) back in the contiguous layout,
    where the pre-hook moved the input to channels-last."""
    first = inputs[0] if inputs else None
    if not isinstance(first, torch.Tensor) or first.dim() != 4 or first.device.type != "cpu":
        return None
    if torch.is_grad_enabled() or not first.is_contiguous(memory_format=torch.channels_last):
        return None
    if isinstance(output, torch.Tensor):
        return output.contiguous()
    if isinstance(output, tuple):
        return tuple(part.contiguous() if isinstance(part, torch.Tensor) else part for part in output)
    return None


def max_pooling_layers(model: nn.Module) -> list[nn.Module]:
    """The model's ``nn.MaxPool2d`` modules (the model itself when it is one)."""
    return [module for module in model.modules() if isinstance(module, nn.MaxPool2d)]


@contextmanager
def channels_last_max_pooling(layers: list[nn.Module]) -> Iterator[None]:
    """Within the block, the ``nn.MaxPool2d`` ``layers`` pool channels-last on the CPU with gradients off (module
    docstring); the hooks are removed on leaving it."""
    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(_to_channels_last))
            handles.append(layer.register_forward_hook(_to_contiguous))
        yield
    finally:
        for handle in handles:
            handle.remove()
