"""How the kernels see a tensor: layouts and zero-copy NumPy views.

The kernels take two layouts of an ``(N, C, *spatial)`` tensor:

* **runs**, ``(N, C, L)`` with ``L`` the spatial size: a C-contiguous
  (channels-first) tensor as it is;
* **rows**, ``(M, C)`` with ``M = N * L``: a 2-D tensor, or a channels-last
  one, whose channels are the innermost, contiguous axis.

Contiguous and channels-last inputs are viewed in place; only other strides
(or float16 / bfloat16, widened to float32) cost a copy. Everything here is
on the per-call path, so layouts are made once per (shape, strides, item
size) and kept in one cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "KERNEL_DTYPES",
    "KernelInput",
    "KernelLayout",
    "KernelTensor",
    "LayerArrays",
    "kernel_input",
    "kernel_view",
]

KERNEL_DTYPES = (torch.float32, torch.float64)
"""The dtypes the kernels take directly; float16 / bfloat16 go through float32."""


class KernelTensor(NamedTuple):
    """A tensor and the kernels' view of the same memory."""

    array: np.ndarray
    tensor: torch.Tensor


class KernelLayout:
    """One layout of one logical shape ``(N, C, *spatial)``.

    Attributes:
        rows: the rows layout ``(M, C)``; else runs ``(N, C, L)``.
        shape: the logical shape.
        kernel_shape: the shape the kernels see.
        channels_last_order: (rows only) the axis order that makes a rows
            tensor C-contiguous, ``(0, 2, ..., 1)``; ``logical_order`` undoes it.
    """

    __slots__ = (
        "channels_last_order",
        "channels_last_shape",
        "kernel_shape",
        "logical_order",
        "rows",
        "shape",
    )

    def __init__(self, rows: bool, shape: tuple[int, ...]) -> None:
        self.rows, self.shape = rows, tuple(shape)
        C = shape[1]
        if rows:
            self.channels_last_order = (0, *range(2, len(shape)), 1)
            self.logical_order = tuple(self.channels_last_order.index(i) for i in range(len(shape)))
            self.channels_last_shape = tuple(shape[p] for p in self.channels_last_order)
            self.kernel_shape: tuple[int, ...] = (math.prod(shape) // C if C else 0, C)
        else:
            self.kernel_shape = (shape[0], C, math.prod(shape[2:]))

    def view(self, a: np.ndarray) -> np.ndarray | None:
        """The kernels' zero-copy view of ``a`` (logical shape), or None if there is none."""
        if self.rows:
            a = a.transpose(self.channels_last_order)
        return a.reshape(self.kernel_shape) if a.flags.c_contiguous else None

    def new_like(self, t: torch.Tensor, dtype: torch.dtype) -> KernelTensor:
        """A new tensor with the strides of ``t`` (a tensor this layout views).

        ``torch.empty_like`` keeps the strides of a dense tensor and is the
        cheapest way to a new tensor (no shape to parse).
        """
        out = torch.empty_like(t, dtype=dtype)
        array = self.view(out.numpy())
        return KernelTensor(array, out) if array is not None else self.empty(dtype)

    def empty(self, dtype: torch.dtype) -> KernelTensor:
        """A new tensor of the logical shape, laid out as this layout reads it."""
        if self.rows:
            t = torch.empty(self.channels_last_shape, dtype=dtype)
            return KernelTensor(t.numpy().reshape(self.kernel_shape), t.permute(self.logical_order))
        t = torch.empty(self.shape, dtype=dtype)
        return KernelTensor(t.numpy().reshape(self.kernel_shape), t)


class KernelInput(NamedTuple):
    """An input as the kernels read it."""

    tensor: torch.Tensor  # the tensor the view is of (the input itself unless it was copied)
    array: np.ndarray  # the kernels' view of it
    layout: KernelLayout


# (shape, strides in bytes, item size) of a NumPy view -> the layout the
# kernels read it in, or None: no zero-copy view (copy to contiguous). The
# item size matters: a float64 (2, 4) contiguous array and a float32 (2, 4)
# view of every other column have the same strides in bytes.
_LAYOUTS: dict[tuple[tuple[int, ...], tuple[int, ...], int], KernelLayout | None] = {}
_CACHE_LIMIT = 4096  # a model fed ever new shapes: start over past this


def _layout_of(a: np.ndarray) -> KernelLayout | None:
    key = (a.shape, a.strides, a.itemsize)
    try:
        return _LAYOUTS[key]
    except KeyError:
        pass
    if len(_LAYOUTS) > _CACHE_LIMIT:
        _LAYOUTS.clear()
    shape = a.shape
    # (N, C, 1, 1) is contiguous both ways: rows keep the channel loop innermost
    rows = len(shape) == 2 or math.prod(shape[2:]) == 1
    found = None
    for layout in (KernelLayout(rows, shape), KernelLayout(True, shape)):
        if layout.view(a) is not None:
            found = layout
            break
    _LAYOUTS[key] = found
    return found


def kernel_input(x: torch.Tensor) -> KernelInput:
    """``x`` as the kernels read it: viewed in place when its strides allow,
    else copied to contiguous; float16 / bfloat16 widened to float32."""
    if x.dtype not in KERNEL_DTYPES:
        x = x.float()  # keeps the memory format
    a = x.numpy(force=True)  # (a view: x is a CPU tensor)
    layout = _layout_of(a)
    if layout is None:
        x = x.contiguous()
        a = x.numpy(force=True)
        layout = _layout_of(a)
        assert layout is not None  # (a contiguous tensor always has one)
    view = layout.view(a)
    assert view is not None  # (the layout was found for these strides)
    return KernelInput(x, view, layout)


def kernel_view(t: torch.Tensor, layout: KernelLayout, dtype: torch.dtype) -> np.ndarray:
    """``t`` (e.g. the output gradient) as the kernels read it in ``layout``,
    converted to ``dtype`` and copied only when its strides need it."""
    if t.dtype != dtype:
        t = t.to(dtype)
    a = t.numpy(force=True)
    view = layout.view(a)
    if view is None:  # e.g. an expanded gradient: one copy in the layout's order
        view = layout.empty(t.dtype).array
        if layout.rows:
            view.reshape(layout.channels_last_shape)[...] = a.transpose(layout.channels_last_order)
        else:
            view.reshape(layout.shape)[...] = a
    return view


class _ArrayOf:
    """A NumPy view of one tensor, and what says it still views that tensor's memory."""

    __slots__ = ("array", "data_ptr", "dtype", "numel", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.data_ptr = tensor.data_ptr()
        self.dtype = tensor.dtype
        self.numel = tensor.numel()
        self.array: np.ndarray = tensor.numpy(force=True)


class LayerArrays:
    """NumPy views of one layer's own float32 / float64 tensors (parameters,
    running statistics, batch counter), made once and reused from call to call.

    ``Tensor.numpy()`` is among the dearer steps of a call on small tensors
    (about 1.5 us with warm caches, 10 us with the cold caches a layer in a
    network finds), and a layer's tensors keep their memory from call to call:
    the optimizer and the running-statistics update write in place. A view is
    reused while the tensor is the same object with the same data pointer,
    dtype and size; a new tensor under the name, an assignment to ``.data``,
    ``set_``, ``resize_`` or a dtype conversion makes a new one. (A kept view
    holds the old memory alive, so no new memory can appear at its address.)
    The views are of this process's memory: a copy of the layer (deepcopy,
    pickle) starts with none.
    """

    __slots__ = ("_views",)

    def __init__(self) -> None:
        self._views: dict[str, _ArrayOf] = {}

    def of(self, name: str, t: torch.Tensor) -> np.ndarray:
        """The view of ``t`` (a float32 / float64 / int64 CPU tensor), the layer's tensor ``name``."""
        view = self._views.get(name)
        if (
            view is None
            or view.tensor is not t
            or view.data_ptr != t.data_ptr()
            or view.dtype != t.dtype
            or view.numel != t.numel()
        ):
            view = self._views[name] = _ArrayOf(t)
        return view.array
