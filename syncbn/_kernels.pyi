"""Typed stub of the compiled kernels, syncbn._kernels: the extension of the
variant syncbn/_kernels.py loads (see _kernels_body.pxi and _variants.py).

Data arrays are C-contiguous, aligned float32 or float64 numpy arrays in
native byte order, of shape (N, C, L) (channels-first) or (M, C) (rows: 2-D
and channels-last input). Per-channel vectors are 1-D float64 arrays of
length C (weight, bias, their gradients and running statistics: float32 or
float64). ``num_threads=0`` means OpenMP's default; the count is capped by
the amount of work. Arguments are checked before anything is written:
TypeError for a wrong type or dtype, a vector or stats array with the wrong
number of dimensions, or a counter of other than one element; ValueError for
any other wrong shape, length, layout, a read-only output or a count out of
range; each saying "expected X (got Y)".

Fused activation and residual: normalize and local_forward take keyword-only
``residual``, ``activation`` (an ACT_* code), ``negative_slope`` and
``preact``: ``z = (x - mean) * invstd * weight + bias [+ residual]``,
``out = activation(z)``, z written to preact if given. backward_reduce and
local_backward take ``activation``, ``negative_slope``, ``saved`` (y, or z
when activation_uses_output is False) and ``grad_preact``, where they write
``dz = dy * activation'(.)``; their sums and parameter gradients are then over
dz, and backward_input takes dz as its dy. Activations and their backward
follow torch's formulas (NaN stays NaN).
"""

import numpy as np
import numpy.typing as npt
from typing_extensions import TypeAlias

_Data: TypeAlias = npt.NDArray[np.floating]
_Vec: TypeAlias = npt.NDArray[np.float64]
_Param: TypeAlias = npt.NDArray[np.floating]  # float32 or float64

def openmp_enabled() -> bool: ...
def max_threads() -> int: ...
def cython_checks_enabled() -> bool: ...

ACT_NONE: int
"""No activation: out = z."""
ACT_RELU: int
"""max(z, 0)."""
ACT_RELU6: int
"""min(max(z, 0), 6)."""
ACT_LEAKY_RELU: int
"""z if z > 0 else z * negative_slope."""
ACT_SILU: int
"""z / (1 + exp(-z))."""

def activation_uses_output(activation: int, negative_slope: float) -> bool:
    """True when the activation's backward can take its output y as saved (none,
    relu, relu6, leaky_relu with negative_slope >= 0); False (silu, leaky_relu
    with a negative slope) when it needs z: pass preact to the forward and z as
    saved. ValueError for an unknown code."""

def local_stats(x: _Data, shift: _Vec, out: _Vec, num_threads: int = 0) -> None:
    """out[:C] = sum(x - shift), out[C:2C] = sum((x - shift)**2), out[2C] = count.

    float64 sums around a pivot (each channel's first value), so a large
    |mean| / std by itself costs no accuracy (a shift far from the mean does:
    see finish_stats' refine); non-finite values give +-inf / NaN sums.
    """

def normalize(
    x: _Data,
    mean: _Vec,
    invstd: _Vec,
    weight: _Param | None,
    bias: _Param | None,
    out: _Data,
    num_threads: int = 0,
    *,
    residual: _Data | None = None,
    activation: int = 0,
    negative_slope: float = 0.01,
    preact: _Data | None = None,
) -> None:
    """out = activation(z), z = (x - mean) * invstd * weight + bias [+ residual];
    z also written to preact if given (not out). out may be x or residual.

    Arithmetic in the dtype of x, centred on mean rounded to it (the rounding
    corrected in float64), so a large |mean| costs no accuracy.
    """

def backward_reduce(
    dy: _Data,
    x: _Data,
    mean: _Vec,
    out: _Vec,
    num_threads: int = 0,
    invstd: _Vec | None = None,
    grad_weight: _Param | None = None,
    grad_bias: _Param | None = None,
    *,
    activation: int = 0,
    negative_slope: float = 0.01,
    saved: _Data | None = None,
    grad_preact: _Data | None = None,
) -> None:
    """out[:C] = sum(dz), out[C:2C] = sum(dz * (x - mean)); and, if given,
    grad_weight = out[C:2C] * invstd, grad_bias = out[:C] (invstd required with grad_weight).

    dz = dy with ACT_NONE (saved and grad_preact must then be None); with an
    activation, dz = dy * activation'(saved), written to grad_preact (both
    required; grad_preact may be dy or saved, not x).
    """

def backward_input(
    dy: _Data,
    x: _Data,
    mean: _Vec,
    invstd: _Vec,
    weight: _Param | None,
    sum_dy: _Vec,
    sum_dy_xmu: _Vec,
    out: _Data,
    num_threads: int = 0,
    count: float = 1.0,
) -> None:
    """out = (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count) * invstd * weight.

    sum_dy, sum_dy_xmu: the global sums of backward_reduce over count values
    per channel (with count=1: the means).

    Arithmetic in the dtype of the data, centred like normalize; out may be dy or x.
    """

REFINE: float
"""(mean - shift)**2 / var above which finish_stats asks for a second pass."""

def finish_stats(
    sums: _Vec,
    shift: _Vec,
    eps: float,
    stats: npt.NDArray[np.float64],
    refine: bool = True,
    next_shift: _Vec | None = None,
    running_mean: npt.NDArray[np.floating] | None = None,
    running_var: npt.NDArray[np.floating] | None = None,
    factor: float | None = 0.0,
    num_batches_tracked: npt.NDArray[np.int64] | None = None,
) -> bool:
    """stats (3, C) = mean, invstd, biased variance from reduced local_stats sums.

    Returns True (only stats[0], the better shift, written) when refine is set
    and some channel has a finite mean - shift with
    (mean - shift)**2 > REFINE * var: sum again around stats[0] and call back
    with refine=False. Otherwise copies the finite means to next_shift, adds 1
    to num_batches_tracked, updates the running statistics (float32 or
    float64, torch's formula, unbiased variance; factor None:
    1 / num_batches_tracked) and returns False.
    """

def local_forward(
    x: _Data,
    weight: _Param | None,
    bias: _Param | None,
    eps: float,
    out: _Data,
    stats: npt.NDArray[np.float64],
    next_shift: _Vec | None = None,
    running_mean: npt.NDArray[np.floating] | None = None,
    running_var: npt.NDArray[np.floating] | None = None,
    factor: float | None = 0.0,
    num_batches_tracked: npt.NDArray[np.int64] | None = None,
    num_threads: int = 0,
    *,
    residual: _Data | None = None,
    activation: int = 0,
    negative_slope: float = 0.01,
    preact: _Data | None = None,
) -> None:
    """A group of one process: statistics and normalization in one call,
    channel by channel for channels-first (N, C, L), a pass over all channels
    at a time for rows (M, C); at least 2 values per channel. Writes what
    local_stats + finish_stats + normalize write (residual, activation and
    preact as in normalize)."""

def local_backward(
    dy: _Data,
    x: _Data,
    mean: _Vec,
    invstd: _Vec,
    weight: _Param | None,
    out: _Data | None = None,
    grad_weight: _Param | None = None,
    grad_bias: _Param | None = None,
    num_threads: int = 0,
    *,
    activation: int = 0,
    negative_slope: float = 0.01,
    saved: _Data | None = None,
    grad_preact: _Data | None = None,
) -> None:
    """A group of one process: backward_reduce's parameter gradients and (with
    out) backward_input's input gradient in one call, channel by channel for
    channels-first (N, C, L), a pass over all channels at a time for rows
    (M, C). activation, saved and grad_preact as in
    backward_reduce; the input gradient is then computed from dz, and out may
    be grad_preact itself."""

def build_flags() -> str:
    """The compiler flags setup.py passed for this extension (compiled into it)."""

def build_compiler() -> str:
    """The compiler that built this extension, as its own macros name it."""

def build_variant() -> str:
    """The variant of the kernels this extension is (setup.py's name for its -march)."""
