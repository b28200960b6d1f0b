"""How the kernels see a tensor: layouts and zero-copy NumPy views.

The kernels take two layouts of an ``(N, C, *spatial)`` tensor:

* **runs**, ``(N, C, L)`` with ``L`` the spatial size: a C-contiguous
  (channels-first) tensor as it is;
* **rows**, ``(M, C)`` with ``M = N * L``: a 2-D tensor, or a channels-last
  one, whose channels are the innermost, contiguous axis.

Contiguous and channels-last inputs are viewed in place; only other strides
(or float16 / bfloat16, widened to float32) cost a copy. Everything here is
on the per-call path, so the layout of a (shape, strides, dtype) is worked
out once, through NumPy's view of the tensor, and kept in a cache; after
that, a tensor's view is made from its address (syncbn/_memory.pyx).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ._memory import array_over

__all__ = [
    "KERNEL_DTYPES",
    "KernelInput",
    "KernelLayout",
    "KernelTensor",
    "LayerArrays",
    "kernel_input",
    "kernel_view",
    "new_vector",
]

KERNEL_DTYPES = (torch.float32, torch.float64)
"""The dtypes the kernels take directly; float16 / bfloat16 go through float32."""


class KernelTensor(NamedTuple):
    """A tensor and the kernels' view of the same memory."""

    array: np.ndarray
    tensor: torch.Tensor


class KernelLayout:
    """One layout of one logical shape ``(N, C, *spatial)``.

    Made once per (rows, shape) by :func:`_kernel_layout` (until the caches
    start over), so that two tensors read in the same layout have the same
    layout object.

    Attributes:
        rows: the rows layout ``(M, C)``; else runs ``(N, C, L)``.
        shape: the logical shape.
        kernel_shape: the shape the kernels see.
        strides: the strides of a new tensor laid out as this layout reads it
            (contiguous, or channels-last for rows).
        channels_last_order: (rows only) the axis order that makes a rows
            tensor C-contiguous, ``(0, 2, ..., 1)``.
    """

    __slots__ = ("channels_last_order", "kernel_shape", "rows", "shape", "strides")

    def __init__(self, rows: bool, shape: tuple[int, ...]) -> None:
        self.rows, self.shape = rows, tuple(shape)
        C = shape[1]
        order = (0, *range(2, len(shape)), 1) if rows else tuple(range(len(shape)))
        strides = [0] * len(shape)
        step = 1
        for axis in reversed(order):
            strides[axis] = step
            step *= max(shape[axis], 1)
        self.strides = tuple(strides)
        if rows:
            self.channels_last_order = order
            self.kernel_shape: tuple[int, ...] = (math.prod(shape) // C if C else 0, C)
        else:
            self.kernel_shape = (shape[0], C, math.prod(shape[2:]))

    def view(self, a: np.ndarray) -> np.ndarray | None:
        """The kernels' zero-copy view of ``a`` (logical shape), or None if there is none."""
        if self.rows:
            a = a.transpose(self.channels_last_order)
        return a.reshape(self.kernel_shape) if a.flags.c_contiguous else None

    def array(self, t: torch.Tensor, dtype: torch.dtype) -> np.ndarray | None:
        """The kernels' view of ``t`` (of dtype ``dtype``, float32 or float64),
        a tensor whose memory this layout reads, as :func:`_layout_of` found
        from its shape, strides and dtype; None if its address is not aligned."""
        return array_over(t, t.data_ptr(), self.kernel_shape, _TYPENUM[dtype])

    def new(self, strides: tuple[int, ...], dtype: torch.dtype) -> KernelTensor:
        """A new tensor of the logical shape with ``strides``: those of a
        tensor this layout reads (the input's, so that the output has its
        memory format), or :attr:`strides`."""
        t = torch.empty_strided(self.shape, strides, dtype=dtype)
        array = self.array(t, dtype)
        assert array is not None  # (torch allocates aligned memory)
        return KernelTensor(array, t)

    def empty(self, dtype: torch.dtype) -> KernelTensor:
        """A new tensor of the logical shape, laid out as this layout reads it."""
        return self.new(self.strides, dtype)


class KernelInput(NamedTuple):
    """An input as the kernels read it."""

    tensor: torch.Tensor  # the tensor the view is of (the input itself unless it was copied)
    array: np.ndarray  # the kernels' view of it
    layout: KernelLayout
    strides: tuple[int, ...]  # the tensor's, which new tensors of the same layout take
    dtype: torch.dtype  # the tensor's
    widened: bool  # whether the input was float16 / bfloat16, and the tensor its float32 copy


_TYPENUM = {torch.float32: np.dtype(np.float32).num, torch.float64: np.dtype(np.float64).num}

# (rows, shape) -> its one KernelLayout (starts over with _LAYOUTS)
_KERNEL_LAYOUTS: dict[tuple[bool, tuple[int, ...]], KernelLayout] = {}
# (shape, strides, dtype) of a tensor -> the layout the kernels read it in,
# or None: no zero-copy view (copy to contiguous). These three decide where
# every value is, so a tensor that matches a key has its memory laid out as
# the layout reads it, and its address is all the view still needs.
_LAYOUTS: dict[tuple[tuple[int, ...], tuple[int, ...], torch.dtype], KernelLayout | None] = {}
_CACHE_LIMIT = 4096  # a model fed ever new shapes: start over past this


def _kernel_layout(rows: bool, shape: tuple[int, ...]) -> KernelLayout:
    key = (rows, shape)
    layout = _KERNEL_LAYOUTS.get(key)
    if layout is None:
        layout = _KERNEL_LAYOUTS[key] = KernelLayout(rows, shape)
    return layout


def _same(a: KernelLayout | None, b: KernelLayout) -> bool:
    """Whether ``a`` is the layout ``b`` (the same object, unless the caches
    started over in between)."""
    return a is b or (a is not None and a.rows == b.rows and a.shape == b.shape)


def _layout_of(t: torch.Tensor, strides: tuple[int, ...], dtype: torch.dtype) -> KernelLayout | None:
    """The layout the kernels read ``t`` in (a tensor of these strides and
    dtype, float32 or float64, without a negative bit), found the first time
    its shape, strides and dtype come, from NumPy's view of it."""
    key = (t.shape, strides, dtype)
    try:
        return _LAYOUTS[key]
    except KeyError:
        pass
    if len(_LAYOUTS) > _CACHE_LIMIT:
        _LAYOUTS.clear()
        _KERNEL_LAYOUTS.clear()
    a = t.detach().numpy()  # (a view, never a copy: no negative or conjugate bit)
    shape = tuple(a.shape)
    # (N, C, 1, 1) is contiguous both ways: rows keep the channel loop innermost
    rows = len(shape) == 2 or math.prod(shape[2:]) == 1
    found = None
    for layout in (_kernel_layout(rows, shape), _kernel_layout(True, shape)):
        if layout.view(a) is not None:
            found = layout
            break
    _LAYOUTS[key] = found
    return found


def kernel_input(x: torch.Tensor) -> KernelInput:
    """``x`` as the kernels read it: viewed in place when its strides allow,
    else copied to contiguous; float16 / bfloat16 widened to float32."""
    dtype = x.dtype
    widened = dtype not in KERNEL_DTYPES
    if widened:
        x, dtype = x.float(), torch.float32  # (keeps the memory format)
    if x.is_neg():  # (a lazily negated view, e.g. the imaginary part of a conjugate)
        x = x.resolve_neg()
    strides = x.stride()
    layout = _layout_of(x, strides, dtype)
    array = None if layout is None else layout.array(x, dtype)
    if layout is None or array is None:  # strides the kernels cannot read, or a misaligned address
        x = x.clone(memory_format=torch.contiguous_format)
        strides = x.stride()
        layout = _layout_of(x, strides, dtype)
        assert layout is not None  # (a new contiguous tensor always has one)
        array = layout.array(x, dtype)
        assert array is not None  # (and an aligned address)
    return KernelInput(x, array, layout, strides, dtype, widened)


def kernel_view(t: torch.Tensor, layout: KernelLayout, dtype: torch.dtype) -> np.ndarray:
    """``t`` (e.g. the output gradient) as the kernels read it in ``layout``,
    converted to ``dtype`` and copied only when its strides need it."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.is_neg():
        t = t.resolve_neg()
    view = layout.array(t, dtype) if _same(_layout_of(t, t.stride(), dtype), layout) else None
    if view is not None:
        return view
    a = t.numpy(force=True)
    view = layout.view(a)
    if view is None or not view.flags.aligned:  # e.g. an expanded gradient: one copy in the layout's order
        view = layout.empty(dtype).array
        if layout.rows:
            shape = tuple(layout.shape[p] for p in layout.channels_last_order)
            view.reshape(shape)[...] = a.transpose(layout.channels_last_order)
        else:
            view.reshape(layout.shape)[...] = a
    return view


def new_vector(size: int, dtype: torch.dtype) -> KernelTensor:
    """A new 1-D tensor of ``size`` values of ``dtype`` (float32 or float64)
    and the kernels' view of it."""
    t = torch.empty(size, dtype=dtype)
    array = array_over(t, t.data_ptr(), (size,), _TYPENUM[dtype])
    assert array is not None  # (torch allocates aligned memory)
    return KernelTensor(array, t)


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
