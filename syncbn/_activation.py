"""The activations a batch-norm layer can apply after itself, and the
residual add before them.

``y = activation(bn(x) + residual)``: the names here are the layers'
``activation=`` argument; :func:`apply_activation` is the unfused torch
composition, what the fused kernels must equal and what the unsynchronized
and compiled paths compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _kernels

__all__ = ["ACTIVATIONS", "KERNEL_ACTIVATIONS", "apply_activation", "check_activation", "check_residual"]

ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu")
"""The names ``activation=`` takes (besides None)."""

KERNEL_ACTIVATIONS: dict[str | None, int] = {
    None: _kernels.ACT_NONE,
    "relu": _kernels.ACT_RELU,
    "relu6": _kernels.ACT_RELU6,
    "leaky_relu": _kernels.ACT_LEAKY_RELU,
    "silu": _kernels.ACT_SILU,
}
"""``activation=`` names -> the kernels' activation codes."""


def check_activation(activation: object, negative_slope: object) -> None:
    """Raise if ``activation`` is not None or one of :data:`ACTIVATIONS`, or
    ``negative_slope`` is not a real number."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(
            f"activation: expected None or one of {', '.join(map(repr, ACTIVATIONS))} (got {activation!r})"
        )
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, (int, float)):
        raise TypeError(f"negative_slope: expected a float (got {type(negative_slope).__name__})")


def check_residual(name: str, input: torch.Tensor, residual: torch.Tensor) -> None:
    """Raise unless ``residual`` can be added to the layer's output as it is:
    a CPU tensor of the input's shape and dtype (no broadcasting, no type
    promotion, so nothing changes the meaning of the sum)."""
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"{name}: expected residual to be a torch.Tensor (got {type(residual).__name__})")
    if residual.shape != input.shape:
        raise ValueError(
            f"{name}: expected residual of the input's shape {list(input.shape)} (got {list(residual.shape)})"
        )
    if residual.dtype != input.dtype:
        raise TypeError(
            f"{name}: expected residual of the input's dtype {input.dtype} (got {residual.dtype})"
        )
    if not residual.is_cpu:
        raise ValueError(f"{name}: expected residual to be a CPU tensor (got device {residual.device})")


def apply_activation(z: torch.Tensor, activation: str | None, negative_slope: float) -> torch.Tensor:
    """``activation(z)`` with torch's functions (not in place)."""
    if activation is None:
        return z
    if activation == "relu":
        return F.relu(z)
    if activation == "relu6":
        return F.relu6(z)
    if activation == "leaky_relu":
        return F.leaky_relu(z, negative_slope)
    if activation == "silu":
        return F.silu(z)
    raise AssertionError(activation)  # (checked by check_activation)
