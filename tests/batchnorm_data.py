"""Data for comparing a synchronized layer with torch's batch norm.

A batch whose channels have different means and scales and a loss weight
(so a mix-up of channels shows), and affine parameters away from the
defaults 1 and 0 (so a dropped or swapped weight shows). Used by the
single-process tests and by the multi-process worker alike.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from syncbn.comm import Communicator

# channels: few, so that every test stays small
C = 3

# name: (input shape, reference class, memory format)
LAYOUTS = {
    "2d": ((6, C), nn.BatchNorm1d, torch.contiguous_format),
    "3d": ((4, C, 5), nn.BatchNorm1d, torch.contiguous_format),
    "4d": ((4, C, 5, 6), nn.BatchNorm2d, torch.contiguous_format),
    "5d": ((3, C, 2, 4, 5), nn.BatchNorm3d, torch.contiguous_format),
    "channels_last": ((4, C, 5, 6), nn.BatchNorm2d, torch.channels_last),
    "channels_last_3d": ((3, C, 2, 4, 5), nn.BatchNorm3d, torch.channels_last_3d),
}

# a synchronized layer against torch's batch norm, in the same dtype
TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
}


class PartnerWithoutSamples(Communicator):
    """Two ranks, the other one with an empty batch: its contribution to every
    sum is zero, so the allreduce leaves the buffer as it is; but the layer
    takes the synchronized path, one collective per pass."""

    name = "partner-without-samples"
    _size = 2

    def _allreduce(self, buf: torch.Tensor) -> None:
        pass


def batch(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype,
          memory_format: torch.memory_format = torch.contiguous_format,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (channel c: mean 3c - 2, scale c + 1) and a loss weight, drawn from ``gen``."""
    bcast = (1, shape[1]) + (1,) * (len(shape) - 2)
    offset = torch.arange(shape[1], dtype=torch.float64).view(bcast) * 3 - 2
    scale = torch.arange(1, shape[1] + 1, dtype=torch.float64).view(bcast)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(dtype).contiguous(memory_format=memory_format), g.to(dtype)


def set_random_affine(layer: nn.Module, seed: int) -> None:
    """Weight in [0.5, 1.5) and a normal bias from ``seed``, if the layer has them."""
    if layer.affine:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            layer.weight.copy_(torch.rand(layer.num_features, generator=gen, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(layer.num_features, generator=gen, dtype=torch.float64))


def negated_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor equal to ``t`` whose memory holds ``-t`` (the negative bit)."""
    n = torch._neg_view(-t)
    assert n.is_neg() and n.is_contiguous() and torch.equal(n, t)
    return n


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (contiguous) at an address 2 bytes past its dtype's alignment."""
    size = t.element_size()
    buffer = bytearray(t.numel() * size + size + 2)
    start = (-torch.frombuffer(buffer, dtype=torch.uint8).data_ptr()) % size + 2
    out = torch.frombuffer(buffer, dtype=t.dtype, count=t.numel(), offset=start).view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % size == 2
    return out


# What a fused layer's activation must equal: torch's own functions.
REFERENCE_ACTIVATIONS: dict[Optional[str], Callable[[torch.Tensor, float], torch.Tensor]] = {
    None: lambda z, slope: z,
    "relu": lambda z, slope: F.relu(z),
    "relu6": lambda z, slope: F.relu6(z),
    "leaky_relu": F.leaky_relu,
    "silu": lambda z, slope: F.silu(z),
}


def apply_activation(z: torch.Tensor, activation: Optional[str], negative_slope: float) -> torch.Tensor:
    """The reference ``activation(z)``, torch's function."""
    return REFERENCE_ACTIVATIONS[activation](z, negative_slope)
