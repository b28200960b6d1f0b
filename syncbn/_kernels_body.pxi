# The body of the kernels, syncbn._kernels: setup.py compiles it once per
# variant (a tiny generated syncbn._kernels_<variant>.pyx includes it, built
# with that variant's -march) and syncbn/_kernels.py loads the best variant the
# CPU runs (see syncbn/_variants.py).
"""Per-channel kernels of synchronized batch normalization.

Two memory layouts, so that no input ever needs a transposed copy:

* channels-first ``(N, C, L)``: NCHW / NCDHW / (N, C, L) tensors, L = product
  of the spatial dimensions (L may be 1);
* rows ``(M, C)``: 2-D input and channels-last tensors, M = N * spatial.

Both must be C-contiguous, float32 or float64. Per-channel vectors have
length C: the statistics (shift, mean, invstd, sums) are float64; weight,
bias, their gradients and the running statistics are float32 or float64,
used in their own dtype. Every reduction accumulates in float64 whatever the
input dtype.

Each public ``def`` validates (with the numpy C API: well under a microsecond)
and raises errors saying "expected X (got Y)"; the arithmetic lives in
``noexcept nogil`` helpers over typed memoryviews, fused over float and
double. The helpers index the memoryviews in their inner loops, so a build
with SYNCBN_CYTHON_CHECKS=1 checks every access to the data; the short
per-channel loops of the ``def`` functions (and all of finish_stats) use raw
pointers to vectors whose lengths were validated, which it does not check.
The helpers see a channels-first tensor as its (N * C, L) matrix of runs:
row r = n * C + c is the run of channel c in sample n.

``num_threads=0`` means "as many as OpenMP allows"; the count is further
capped by the amount of work, so small tensors never pay for a thread team,
and one thread runs without a parallel region.

How the work is split. A channels-first tensor is N * C runs of L contiguous
values; when there are fewer runs than the threads need (C small, N * L
large) each run is cut into S *pieces* (S > 1 only with several threads and
runs of more than MIN_PIECE values). Pieces (or rows, for the rows layout)
are dealt out in one contiguous *share* per thread, each share with its own
partial sums, merged in share order at the end, so the result depends on the
thread count the work split chose, not on how many threads OpenMP actually
starts. The reductions go through short runs (L < STREAM_MIN_L) channel by
channel and through long runs in memory order; rows a block of ROWS rows at
a time. The element-wise passes go in memory order.

Accuracy. Sums are float64 and two-level: the first level sums at most BLOCK
consecutive values of one run (rows: ROWS rows of each column), the second
adds those block sums one after another, per channel and share. For a
channel of n values the longest chain of additions is about
min(L, BLOCK) + n / min(L, BLOCK) terms (rows: ROWS + n / ROWS) instead of n:
a few thousand for long runs, but up to about N for short ones (one block
per run).

Vectorization. The reduction loops vectorize only when the compiler may
reorder their float64 sums: setup.py passes -fassociative-math and its
companions (see there why that is safe here). Check with SYNCBN_VEC_REPORT=1;
scripts/bench_kernels.py measures them.

Fused activation and residual. normalize and local_forward can add a
residual after the affine transform and apply an activation (ACT_*) in the
same pass: ``z = (x - mean) * invstd * weight + bias [+ residual]``,
``out = activation(z)``, and z written to ``preact`` when the backward needs
it (activation_uses_output). backward_reduce and local_backward then take
dy, the gradient of the output, and the saved output (or z): they write
``dz = dy * activation'(.)`` to ``grad_preact`` (which is also the residual's
gradient) and reduce over dz; backward_input takes dz as its dy. Each
activation has loops of its own (it is a type, activation_kind, so the
choice is made once per pass, outside the loops; silu's exp is the kernels'
own, syncbn_expf / syncbn_exp, which vectorizes), and without a residual or
an activation the kernels run the loops they ran before these existed. With
a residual, z is a sum of three terms whose order -fassociative-math leaves
to the compiler: float32 z is within a few ulps of those terms, and where a
pass is compiled twice (one thread, several) the two may round differently.
"""

cimport cython
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport INFINITY, isfinite, sqrt
from libc.stdint cimport int64_t

import numpy as np

cnp.import_array()

ctypedef fused floating:
    float
    double

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int syncbn_max_threads(void) { return omp_get_max_threads(); }
    static const int SYNCBN_OPENMP = 1;
    #else
    static int syncbn_max_threads(void) { return 1; }
    static const int SYNCBN_OPENMP = 0;
    #endif
    """
    int syncbn_max_threads() noexcept nogil
    const int SYNCBN_OPENMP

cdef extern from *:
    """
    #ifndef SYNCBN_CYTHON_CHECKS
    #define SYNCBN_CYTHON_CHECKS 0
    #endif
    """
    const int SYNCBN_CYTHON_CHECKS


cdef enum:
    # Elements per thread below which another thread costs more than it saves
    # (measured on 2 cores: break-even near 100K values, a clear gain from
    # 130K; below that the team's start and its idle spinning after the
    # region cost more than the halved loop saves).
    GRAIN = 65536
    # Runs are cut (when fewer than the threads need) into at most
    # ceil(L / MIN_PIECE) pieces: all but a run's last have over MIN_PIECE / 2 values.
    MIN_PIECE = 4096
    # Runs at least this long are reduced in memory order, run by run; shorter
    # runs channel by channel, all N runs of a channel into one partial sum.
    STREAM_MIN_L = 256
    # Values of a run summed before the partial sums go to the second level.
    BLOCK = 4096
    # Rows summed (rows layout) before the partial sums go to the second level.
    ROWS = 256

# Rows of a share's partial sums, acc[t] of the (nt + 1, ACC_ROWS, >= C) array
# of _partials: the two sums of a reduction (local_stats: of x - pivot and its
# square; backward_reduce: of dy and dy * (x - mean)), and the sums of the
# current block of ROWS rows (rows layout only) before they go to the first two.
cdef enum:
    SUM1 = 0
    SUM2 = 1
    BLOCK_SUM1 = 2
    BLOCK_SUM2 = 3
    ACC_ROWS = 4

# Rows of the (COEF_ROWS, C) per-channel coefficients m, a, b, k of an affine pass:
#   forward:   out = (x - m) * a + k
#   backward:  out = dy * a + ((x - m) * b + k)
cdef enum:
    COEF_MEAN = 0       # m: the mean (float32 data: rounded to float32, see _float_coefs)
    COEF_SCALE = 1      # a: invstd * weight
    COEF_XMU = 2        # b: the backward form's coefficient of x - m (0 in the forward form)
    COEF_OFFSET = 3     # k: bias (forward) or -a * mean(dy) (backward), float32 data:
                        #    plus the correction for the rounding of m
    COEF_ROWS = 4

# (mean - shift)^2 / var above which finish_stats asks for the sums again
# around the mean. The variance's relative error is about 1e-16 times this
# ratio, so below it float64 statistics keep 10 digits or more. In training
# the shift is the previous batch's mean and the ratio is about 1 / count; it
# passes 1e6 only on a first batch with |mean| / std above 1000, or after a
# jump of the input's mean by a thousand standard deviations.
cdef double _REFINE = 1e6
REFINE = _REFINE


def openmp_enabled() -> bool:
    """Whether the extension was compiled with OpenMP."""
    return SYNCBN_OPENMP == 1


def cython_checks_enabled() -> bool:
    """Whether the extension was built with Cython's bounds/wraparound checks."""
    return SYNCBN_CYTHON_CHECKS == 1


def max_threads() -> int:
    """OpenMP's default thread count (1 without OpenMP)."""
    return syncbn_max_threads()


# ---------------------------------------------------------------------------
# validation (numpy C API: a few hundred nanoseconds per call)
# ---------------------------------------------------------------------------

cdef str _describe(object a):
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    flags = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    dtype = a.dtype.str if a.dtype.byteorder == ">" else a.dtype
    return f"{dtype} array of shape {a.shape}, {flags}"


cdef int _check_layout(str name, cnp.ndarray a, bint writeable) except -1:
    cdef object o = a
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(
            f"{name}: expected a C-contiguous array (got strides {o.strides} "
            f"for shape {o.shape}); pass np.ascontiguousarray(...)")
    if not cnp.PyArray_ISALIGNED(a):
        raise ValueError(f"{name}: expected an aligned array (got a misaligned view); "
                         f"pass a copy")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: expected a writeable array (got a read-only one)")
    return 0


cdef Py_ssize_t _check_data(str name, object x, bint writeable=False) except -1:
    """Check a data array; return its channel count."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray (got {type(x).__name__})")
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int t = cnp.PyArray_TYPE(a)
    if cnp.PyArray_NDIM(a) != 2 and cnp.PyArray_NDIM(a) != 3:
        raise ValueError(
            f"{name}: expected shape (N, C, L) channels-first or (M, C) rows "
            f"(got {x.ndim} dimensions, shape {x.shape})")
    if (t != cnp.NPY_FLOAT32 and t != cnp.NPY_FLOAT64) or cnp.PyArray_ISBYTESWAPPED(a):
        raise TypeError(f"{name}: expected dtype float32 or float64 in native byte order "
                        f"(got {a.dtype.str if cnp.PyArray_ISBYTESWAPPED(a) else a.dtype})")
    _check_layout(name, a, writeable)
    return cnp.PyArray_DIM(a, 1)


cdef int _check_same(str name, object x, str ref_name, cnp.ndarray ref,
                     bint writeable=False) except -1:
    _check_data(name, x, writeable)
    cdef cnp.ndarray a = <cnp.ndarray>x
    if cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(ref):
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name} (got {a.dtype})")
    if not cnp.PyArray_SAMESHAPE(a, ref):
        raise ValueError(
            f"{name}: expected shape {(<object>ref).shape} like {ref_name} (got {x.shape})")
    return 0


cdef object _vec(str name, object v, Py_ssize_t n, bint allow_none=False,
                 bint writeable=False):
    """Check a float64 vector of length n; return it (None for an allowed None)."""
    if v is None and allow_none:
        return None
    if (not isinstance(v, np.ndarray)
            or cnp.PyArray_TYPE(<cnp.ndarray>v) != cnp.NPY_FLOAT64
            or cnp.PyArray_ISBYTESWAPPED(<cnp.ndarray>v)
            or cnp.PyArray_NDIM(<cnp.ndarray>v) != 1):
        raise TypeError(
            f"{name}: expected a 1-D float64 numpy.ndarray of length {n} (got {_describe(v)})")
    cdef cnp.ndarray a = <cnp.ndarray>v
    if cnp.PyArray_DIM(a, 0) != n:
        raise ValueError(f"{name}: expected length {n} (got {v.shape[0]})")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}: expected a contiguous array (got strides {v.strides})")
    _check_layout(name, a, writeable)
    return v


cdef struct FVec:
    # a per-channel float32 or float64 vector (data NULL for None)
    char* data
    bint single


cdef FVec _fvec(str name, object v, Py_ssize_t n, bint writeable=False) except *:
    """Check a 1-D float32 or float64 vector of length n, or None (parameters,
    running statistics: taken in their own dtype, no float64 copy needed)."""
    cdef FVec f
    f.data = NULL
    f.single = False
    if v is None:
        return f
    if (not isinstance(v, np.ndarray) or cnp.PyArray_NDIM(<cnp.ndarray>v) != 1
            or cnp.PyArray_ISBYTESWAPPED(<cnp.ndarray>v)
            or cnp.PyArray_TYPE(<cnp.ndarray>v) not in (cnp.NPY_FLOAT32, cnp.NPY_FLOAT64)):
        raise TypeError(f"{name}: expected a 1-D float32 or float64 numpy.ndarray of "
                        f"length {n} (got {_describe(v)})")
    if cnp.PyArray_DIM(<cnp.ndarray>v, 0) != n:
        raise ValueError(f"{name}: expected length {n} (got {v.shape[0]})")
    _check_layout(name, <cnp.ndarray>v, writeable)
    f.data = <char*>cnp.PyArray_DATA(<cnp.ndarray>v)
    f.single = cnp.PyArray_TYPE(<cnp.ndarray>v) == cnp.NPY_FLOAT32
    return f


cdef inline double _fat(FVec f, Py_ssize_t c, double absent) noexcept nogil:
    """f[c] as a double (absent for None)."""
    if f.data == NULL:
        return absent
    return (<float*>f.data)[c] if f.single else (<double*>f.data)[c]


cdef int64_t* _counter(str name, object v) except? NULL:
    """The int64 of a one-element writeable int64 array (any number of
    dimensions: a 0-d view of a tensor's counter will do), or NULL for None."""
    if v is None:
        return NULL
    if (not isinstance(v, np.ndarray) or cnp.PyArray_TYPE(<cnp.ndarray>v) != cnp.NPY_INT64
            or cnp.PyArray_ISBYTESWAPPED(<cnp.ndarray>v) or cnp.PyArray_SIZE(<cnp.ndarray>v) != 1):
        raise TypeError(f"{name}: expected an int64 numpy.ndarray of one element "
                        f"(got {_describe(v)})")
    _check_layout(name, <cnp.ndarray>v, True)
    return <int64_t*>cnp.PyArray_DATA(<cnp.ndarray>v)


cdef inline void _fput(FVec f, Py_ssize_t c, double v) noexcept nogil:
    """f[c] = v, rounded to f's dtype."""
    if f.single:
        (<float*>f.data)[c] = <float>v
    else:
        (<double*>f.data)[c] = v


cdef inline double* _ptr(object v):
    """The data of a vector _vec accepted (NULL for None)."""
    return NULL if v is None else <double*>cnp.PyArray_DATA(<cnp.ndarray>v)


cdef object _rows(cnp.ndarray x):
    """The 2-D view the kernels index: (N * C, L) runs for channels-first, x for rows."""
    if cnp.PyArray_NDIM(x) == 3:
        return cnp.PyArray_Reshape(
            x, (cnp.PyArray_DIM(x, 0) * cnp.PyArray_DIM(x, 1), cnp.PyArray_DIM(x, 2)))
    return x


# ---------------------------------------------------------------------------
# the activations of the fused passes: codes and checks
# ---------------------------------------------------------------------------

cdef enum:
    _ACT_NONE = 0
    _ACT_RELU = 1
    _ACT_RELU6 = 2
    _ACT_LEAKY_RELU = 3
    _ACT_SILU = 4
    _ACT_COUNT = 5

ACT_NONE = _ACT_NONE
ACT_RELU = _ACT_RELU
ACT_RELU6 = _ACT_RELU6
ACT_LEAKY_RELU = _ACT_LEAKY_RELU
ACT_SILU = _ACT_SILU


cdef int _check_activation(int activation) except -1:
    if activation < 0 or activation >= _ACT_COUNT:
        raise ValueError(
            f"activation: expected one of ACT_NONE (0), ACT_RELU (1), ACT_RELU6 (2), "
            f"ACT_LEAKY_RELU (3), ACT_SILU (4) (got {activation})")
    return 0


def activation_uses_output(int activation, double negative_slope) -> bool:
    """Whether the backward of ``activation`` takes its output y as the saved
    values: True for ACT_NONE, ACT_RELU, ACT_RELU6 and ACT_LEAKY_RELU with
    ``negative_slope >= 0``, whose derivative y alone determines. False for
    ACT_SILU and ACT_LEAKY_RELU with a negative (or NaN) slope, where the sign
    of y does not tell the sign of z: the forward must then write z to
    ``preact`` and the backward take z as ``saved``. ValueError for an unknown
    code.
    """
    _check_activation(activation)
    if activation == _ACT_SILU:
        return False
    if activation == _ACT_LEAKY_RELU:
        return negative_slope >= 0.0
    return True


cdef bint _same_start(object a, object b):
    """Whether two checked, non-empty arrays start at the same address."""
    return (cnp.PyArray_SIZE(<cnp.ndarray>a) > 0
            and cnp.PyArray_DATA(<cnp.ndarray>a) == cnp.PyArray_DATA(<cnp.ndarray>b))


cdef int _check_fused_forward(cnp.ndarray x, object out, object residual, int activation,
                              object preact) except -1:
    """Check the residual, activation and preact of normalize and local_forward."""
    _check_activation(activation)
    if residual is not None:
        _check_same("residual", residual, "x", x)
    if preact is not None:
        if activation == _ACT_NONE:
            raise ValueError(f"preact: expected None with ACT_NONE, where z is the output "
                             f"(got {_describe(preact)})")
        _check_same("preact", preact, "x", x, True)
        if _same_start(preact, out):
            raise ValueError("preact: expected an array apart from out (got out itself)")
    return 0


cdef int _check_fused_backward(cnp.ndarray dy, object x, int activation, object saved,
                               object grad_preact) except -1:
    """Check the activation, saved and grad_preact of backward_reduce and local_backward."""
    # (no loop over a tuple of the two: building it costs as much as the
    # rest of a call on a small tensor)
    _check_activation(activation)
    if activation == _ACT_NONE:
        if saved is not None:
            raise ValueError(f"saved: expected None with ACT_NONE, where dz is dy "
                             f"(got {_describe(saved)})")
        if grad_preact is not None:
            raise ValueError(f"grad_preact: expected None with ACT_NONE, where dz is dy "
                             f"(got {_describe(grad_preact)})")
        return 0
    if saved is None:
        raise ValueError("saved: expected an array like dy with an activation (got None)")
    if grad_preact is None:
        raise ValueError("grad_preact: expected an array like dy with an activation (got None)")
    _check_same("saved", saved, "dy", dy)
    _check_same("grad_preact", grad_preact, "dy", dy, True)
    if _same_start(grad_preact, x):
        raise ValueError("grad_preact: expected an array apart from x, which the pass "
                         "reads after writing dz (got x itself)")
    return 0

# ---------------------------------------------------------------------------
# inner loops
# ---------------------------------------------------------------------------

# Both reductions are a pair of sums over the same values: the statistics
# sum(x - p) and sum((x - p)^2) around a pivot p (dot False), the backward's
# sum(dy) and sum(dy * (x - mu)) (dot True). Along a run one skeleton serves
# both; the branch on dot sits outside the inner loops, so each inner loop is
# a plain loop of its own that the compiler vectorizes.

cdef inline void _run_sums(
    const floating[:, ::1] dy,  # IN  runs (read only when dot)
    const floating[:, ::1] x,   # IN  like dy
    Py_ssize_t r,               # IN  run
    Py_ssize_t start,           # IN
    Py_ssize_t stop,            # IN
    double ref,                 # IN  the pivot p, or the mean mu when dot
    bint dot,                   # IN  the backward's sums
    double* s1,                 # OUT += sum(x - p), or sum(dy), over x[r, start:stop]
    double* s2,                 # OUT += sum((x - p)^2), or sum(dy * (x - mu))
) noexcept nogil:
    cdef double a, b, d, g
    cdef Py_ssize_t i, j, e
    j = start
    while j < stop:
        e = min(j + BLOCK, stop)
        a = 0.0
        b = 0.0
        if dot:
            for i in range(j, e):
                g = <double>dy[r, i]
                a += g
                b += g * (<double>x[r, i] - ref)
        else:
            for i in range(j, e):
                d = <double>x[r, i] - ref
                a += d
                b += d * d
        s1[0] += a
        s2[0] += b
        j = e


cdef void _cols_moments(
    const floating[:, ::1] x,   # IN  (M, C) rows
    Py_ssize_t m0,              # IN  first row
    Py_ssize_t m1,              # IN  end row
    const double[::1] p,        # IN  (C,) pivot
    double[:, :, ::1] acc,      # OUT acc[t, SUM1] += sum(x - p), acc[t, SUM2] += sum((x - p)^2)
    Py_ssize_t t,               # IN  share; acc[t, BLOCK_SUM1:] are scratch
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[1], j, e, m, c
    cdef double d, d1, d2, d3
    j = m0
    while j < m1:
        e = min(j + ROWS, m1)
        for c in range(C):
            acc[t, BLOCK_SUM1, c] = 0.0
            acc[t, BLOCK_SUM2, c] = 0.0
        # four rows at a time: a quarter of the loads and stores of the scratch
        m = j
        while m + 4 <= e:
            for c in range(C):
                d = <double>x[m, c] - p[c]
                d1 = <double>x[m + 1, c] - p[c]
                d2 = <double>x[m + 2, c] - p[c]
                d3 = <double>x[m + 3, c] - p[c]
                acc[t, BLOCK_SUM1, c] += (d + d1) + (d2 + d3)
                acc[t, BLOCK_SUM2, c] += (d * d + d1 * d1) + (d2 * d2 + d3 * d3)
            m += 4
        while m < e:
            for c in range(C):
                d = <double>x[m, c] - p[c]
                acc[t, BLOCK_SUM1, c] += d
                acc[t, BLOCK_SUM2, c] += d * d
            m += 1
        for c in range(C):
            acc[t, SUM1, c] += acc[t, BLOCK_SUM1, c]
            acc[t, SUM2, c] += acc[t, BLOCK_SUM2, c]
        j = e


# _cols_dot is _cols_moments with the backward's sums: the same row blocking,
# written twice on purpose. One function for both (a dot flag, as _run_sums
# has) made local_stats about 5% slower on short-run channels-first tensors
# (2x512x7x7, measured against this form): both are inlined into _sums_share,
# and the merged one changed gcc's code for the whole of it.
cdef void _cols_dot(
    const floating[:, ::1] dy,  # IN  (M, C) rows
    const floating[:, ::1] x,   # IN  like dy
    Py_ssize_t m0,              # IN  first row
    Py_ssize_t m1,              # IN  end row
    const double[::1] mu,       # IN  (C,)
    double[:, :, ::1] acc,      # OUT acc[t, SUM1] += sum(dy), acc[t, SUM2] += sum(dy * (x - mu))
    Py_ssize_t t,               # IN  share; acc[t, BLOCK_SUM1:] are scratch
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[1], j, e, m, c
    cdef double g, g1, g2, g3
    j = m0
    while j < m1:
        e = min(j + ROWS, m1)
        for c in range(C):
            acc[t, BLOCK_SUM1, c] = 0.0
            acc[t, BLOCK_SUM2, c] = 0.0
        # four rows at a time: a quarter of the loads and stores of the scratch
        m = j
        while m + 4 <= e:
            for c in range(C):
                g = <double>dy[m, c]
                g1 = <double>dy[m + 1, c]
                g2 = <double>dy[m + 2, c]
                g3 = <double>dy[m + 3, c]
                acc[t, BLOCK_SUM1, c] += (g + g1) + (g2 + g3)
                acc[t, BLOCK_SUM2, c] += ((g * (<double>x[m, c] - mu[c])
                                  + g1 * (<double>x[m + 1, c] - mu[c]))
                                 + (g2 * (<double>x[m + 2, c] - mu[c])
                                    + g3 * (<double>x[m + 3, c] - mu[c])))
            m += 4
        while m < e:
            for c in range(C):
                g = <double>dy[m, c]
                acc[t, BLOCK_SUM1, c] += g
                acc[t, BLOCK_SUM2, c] += g * (<double>x[m, c] - mu[c])
            m += 1
        for c in range(C):
            acc[t, SUM1, c] += acc[t, BLOCK_SUM1, c]
            acc[t, SUM2, c] += acc[t, BLOCK_SUM2, c]
        j = e


cdef inline void _affine_run(
    const floating[:, ::1] x,   # IN  runs
    const floating[:, ::1] z,   # IN  like x (read only when two)
    floating[:, ::1] out,       # OUT like x (may be x or z)
    Py_ssize_t r,               # IN  run
    Py_ssize_t start,           # IN
    Py_ssize_t stop,            # IN
    floating m,                 # IN  centre
    floating a,                 # IN  coefficient
    floating b,                 # IN  coefficient of z - m (two)
    floating k,                 # IN  constant
    bint two,                   # IN  out = x * a + ((z - m) * b + k), else (x - m) * a + k
) noexcept nogil:
    # each value is loaded before its own result is stored, so out may be x or z;
    # the arithmetic is in the dtype of x (see _float_coefs for why that is accurate)
    cdef Py_ssize_t i
    if two:
        for i in range(start, stop):
            out[r, i] = x[r, i] * a + ((z[r, i] - m) * b + k)
    else:
        for i in range(start, stop):
            out[r, i] = (x[r, i] - m) * a + k


cdef void _affine_rows(
    const floating[:, ::1] x,   # IN  (M, C) rows
    const floating[:, ::1] z,   # IN  like x (read only when two)
    floating[:, ::1] out,       # OUT like x (may be x or z)
    Py_ssize_t m0,              # IN  first row
    Py_ssize_t m1,              # IN  end row
    const floating[:, ::1] coef,  # IN  (COEF_ROWS, C) m, a, b, k as in _affine_run
    bint two,                   # IN  as in _affine_run
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[1], m, c
    for m in range(m0, m1):
        if two:
            for c in range(C):
                out[m, c] = x[m, c] * coef[COEF_SCALE, c] + (
                    (z[m, c] - coef[COEF_MEAN, c]) * coef[COEF_XMU, c] + coef[COEF_OFFSET, c])
        else:
            for c in range(C):
                out[m, c] = ((x[m, c] - coef[COEF_MEAN, c]) * coef[COEF_SCALE, c]
                             + coef[COEF_OFFSET, c])


# ---------------------------------------------------------------------------
# inner loops of the fused activation and residual
#
# An activation is a type here, not a code: each function over activation_kind
# is compiled once per activation (and dtype), its `if activation_kind is ...`
# branches resolved at compile time, so every inner loop below is one plain
# loop that the compiler vectorizes (silu's calls to exp aside). A pass with
# neither a residual nor an activation never comes here: it runs the loops
# above, as it did before these existed.
# ---------------------------------------------------------------------------

cdef struct NoActivation:   # (a residual without an activation)
    char unused
cdef struct Relu:
    char unused
cdef struct Relu6:
    char unused
cdef struct LeakyRelu:
    char unused
cdef struct Silu:
    char unused

ctypedef fused activation_kind:
    NoActivation
    Relu
    Relu6
    LeakyRelu
    Silu

# a value of each type, to pass (never read)
cdef NoActivation _NO_ACTIVATION
cdef Relu _RELU
cdef Relu6 _RELU6
cdef LeakyRelu _LEAKY_RELU
cdef Silu _SILU

cdef extern from *:
    """
    #include <math.h>
    #include <string.h>
    /* exp for silu, as arithmetic that gcc vectorizes (libm's exp is a call per
       value, which keeps a loop scalar). exp(x) = 2^k exp(r), k = x / ln 2
       rounded, r = x - k ln 2 (|r| <= ln 2 / 2 or a little more), exp(r) by its
       Taylor polynomial, 2^k made from its bits. Within 1 ulp (measured: 0.93 float,
       0.88 double) from exp(-87) to exp(88) (float) or exp(-708) to exp(709)
       (double); above that up to the overflow (88.72..., 709.78...) it stays at
       exp(88) / exp(709), then +inf; below, it stays at exp(-87) / exp(-708) (libm
       goes on down to 0). For silu z / (1 + exp(-z)) and its derivative that changes
       nothing below |z| = 87 (708) and, past it, results under 1e-36 (1e-305) in
       size. NaN gives NaN.
       r needs ln 2 in two parts (Cody and Waite) with fused multiply-adds, which
       -fassociative-math cannot merge back into one product; without hardware
       FMA the float version takes r from double arithmetic and the double
       version is libm's exp. k is rounded as (int)(x / ln 2 + 1024.5) - 1024
       (x / ln 2 > -1024 here), not with a select on the sign of x: gcc then splits
       the loop body into branches and stops vectorizing it. */
    static inline float syncbn_expf(float x) {
        float xc = x >= -87.0f ? x : -87.0f;        /* (NaN goes to -87 here) */
        xc = xc <= 88.0f ? xc : 88.0f;
        int k = (int)(xc * 1.44269504f + 1024.5f) - 1024;
    #ifdef __FMA__
        float r = __builtin_fmaf((float)k, -0.693359375f, xc);
        r = __builtin_fmaf((float)k, 2.12194440e-4f, r);
    #else
        float r = (float)((double)xc - (double)k * 0.6931471805599453);
    #endif
        float p = 1.0f + r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24
                  + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040)))))));
        int bits = (k + 127) << 23;
        float scale;
        memcpy(&scale, &bits, sizeof scale);
        float e = p * scale;
        e = x > 88.72283935546875f ? (float)INFINITY : e;
        return x == x ? e : x;
    }
    #ifdef __FMA__
    static inline double syncbn_exp(double x) {
        double xc = x >= -708.0 ? x : -708.0;       /* (NaN goes to -708 here) */
        xc = xc <= 709.0 ? xc : 709.0;
        int k = (int)(xc * 1.4426950408889634 + 1024.5) - 1024;
        double r = __builtin_fma((double)k, -6.93147180369123816490e-01, xc);
        r = __builtin_fma((double)k, -1.90821492927058770002e-10, r);
        double p = 1.0 + r * (1.0 + r * (1.0 / 2 + r * (1.0 / 6 + r * (1.0 / 24 + r * (1.0 / 120
                   + r * (1.0 / 720 + r * (1.0 / 5040 + r * (1.0 / 40320 + r * (1.0 / 362880
                   + r * (1.0 / 3628800 + r * (1.0 / 39916800 + r * (1.0 / 479001600
                   + r * (1.0 / 6227020800.0)))))))))))));
        long long bits = (long long)(k + 1023) << 52;
        double scale;
        memcpy(&scale, &bits, sizeof scale);
        double e = p * scale;
        e = x > 709.782712893384 ? (double)INFINITY : e;
        return x == x ? e : x;
    }
    #else
    static inline double syncbn_exp(double x) { return exp(x); }
    #endif
    """
    float syncbn_expf(float x) noexcept nogil
    double syncbn_exp(double x) noexcept nogil


# (IEEE float division in both builds, as in finish_stats)
@cython.cdivision(True)
cdef inline floating _act(
    activation_kind kind,       # IN  the activation
    floating z,                 # IN
    floating slope,             # IN  leaky_relu's negative slope
) noexcept nogil:
    """activation(z) as torch computes it: relu and relu6 clamp (NaN stays
    NaN), leaky_relu ``z > 0 ? z : z * slope``, silu ``z / (1 + exp(-z))``
    (exp: see syncbn_expf)."""
    # (a typed one: Cython writes the literal 1 as the double 1.0, which would
    # take float32 silu through double arithmetic)
    cdef floating one = 1
    if activation_kind is Relu:
        return 0 if z < 0 else z
    elif activation_kind is Relu6:
        return 0 if z < 0 else (6 if z > 6 else z)
    elif activation_kind is LeakyRelu:
        return z if z > 0 else z * slope
    elif activation_kind is Silu:
        if floating is float:
            return z / (one + syncbn_expf(-z))
        else:
            return z / (one + syncbn_exp(-z))
    else:
        return z


@cython.cdivision(True)    # (as _act)
cdef inline floating _dact(
    activation_kind kind,       # IN  the activation
    floating g,                 # IN  dy, the gradient of its output
    floating s,                 # IN  the saved value: y, or z (see activation_uses_output)
    floating slope,             # IN  leaky_relu's negative slope
) noexcept nogil:
    """dz = dy * activation'(.), with torch's backward formulas (relu:
    threshold_backward on y; relu6: hardtanh_backward, the same on y as on z;
    leaky_relu: leaky_relu_backward; silu: silu_backward on z).

    At s = NaN relu6 passes dy, as hardtanh_backward's formula (and its
    decomposition, which torch.compile runs) says; torch's eager CPU kernel
    does so only in its scalar loop, its vector loop gives 0."""
    cdef floating sig, one = 1     # (a typed one, as in _act)
    if activation_kind is Relu:
        return 0 if s <= 0 else g
    elif activation_kind is Relu6:
        return 0 if (s <= 0) | (s >= 6) else g
    elif activation_kind is LeakyRelu:
        return g if s > 0 else g * slope
    elif activation_kind is Silu:
        if floating is float:
            sig = one / (one + syncbn_expf(-s))
        else:
            sig = one / (one + syncbn_exp(-s))
        return g * sig * (one + s * (one - sig))
    else:
        return g


cdef inline void _act_affine_run(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] x,   # IN  runs
    const floating[:, ::1] res, # IN  like x: the residual (read only when has_res)
    floating[:, ::1] out,       # OUT like x (may be x or res): activation(z)
    floating[:, ::1] pre,       # OUT like x, not out: z (written only when has_pre)
    Py_ssize_t r,               # IN  run
    Py_ssize_t start,           # IN
    Py_ssize_t stop,            # IN
    floating m,                 # IN  centre
    floating a,                 # IN  coefficient
    floating k,                 # IN  constant
    floating slope,             # IN  leaky_relu's negative slope
    bint has_res,               # IN  z = (x - m) * a + k + res, else (x - m) * a + k
    bint has_pre,               # IN  write z to pre
) noexcept nogil:
    # as in _affine_run, each value is loaded before its results are stored
    cdef Py_ssize_t i
    cdef floating z
    if has_res and has_pre:
        for i in range(start, stop):
            z = (x[r, i] - m) * a + k + res[r, i]
            pre[r, i] = z
            out[r, i] = _act(kind, z, slope)
    elif has_res:
        for i in range(start, stop):
            out[r, i] = _act(kind, (x[r, i] - m) * a + k + res[r, i], slope)
    elif has_pre:
        for i in range(start, stop):
            z = (x[r, i] - m) * a + k
            pre[r, i] = z
            out[r, i] = _act(kind, z, slope)
    else:
        for i in range(start, stop):
            out[r, i] = _act(kind, (x[r, i] - m) * a + k, slope)


cdef void _act_affine_rows(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] x,   # IN  (M, C) rows
    const floating[:, ::1] res, # IN  like x (read only when has_res)
    floating[:, ::1] out,       # OUT like x (may be x or res)
    floating[:, ::1] pre,       # OUT like x, not out (written only when has_pre)
    Py_ssize_t m0,              # IN  first row
    Py_ssize_t m1,              # IN  end row
    const floating[:, ::1] coef,  # IN  (COEF_ROWS, C) m, a, k as in _act_affine_run
    floating slope,             # IN
    bint has_res,               # IN  as in _act_affine_run
    bint has_pre,               # IN
) noexcept nogil:
    # With pre, z goes to pre first and out is taken from pre (a row still in
    # cache): one loop storing both, with the three coefficient rows, needs more
    # run-time alias checks than gcc makes, and stays scalar.
    cdef Py_ssize_t C = x.shape[1], m, c
    for m in range(m0, m1):
        if has_res and has_pre:
            for c in range(C):
                pre[m, c] = ((x[m, c] - coef[COEF_MEAN, c]) * coef[COEF_SCALE, c]
                             + coef[COEF_OFFSET, c] + res[m, c])
        elif has_res:
            for c in range(C):
                out[m, c] = _act(kind, (x[m, c] - coef[COEF_MEAN, c]) * coef[COEF_SCALE, c]
                                 + coef[COEF_OFFSET, c] + res[m, c], slope)
        elif has_pre:
            for c in range(C):
                pre[m, c] = ((x[m, c] - coef[COEF_MEAN, c]) * coef[COEF_SCALE, c]
                             + coef[COEF_OFFSET, c])
        else:
            for c in range(C):
                out[m, c] = _act(kind, (x[m, c] - coef[COEF_MEAN, c]) * coef[COEF_SCALE, c]
                                 + coef[COEF_OFFSET, c], slope)
        if has_pre:
            for c in range(C):
                out[m, c] = _act(kind, pre[m, c], slope)


cdef inline void _act_run_sums(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] dy,  # IN  runs: the gradient of the output
    const floating[:, ::1] s,   # IN  like dy: the saved output (or z)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] gz,        # OUT like dy (may be dy or s, not x): dz
    Py_ssize_t r,               # IN  run
    Py_ssize_t start,           # IN
    Py_ssize_t stop,            # IN
    double mu,                  # IN  the mean
    floating slope,             # IN  leaky_relu's negative slope
    double* s1,                 # OUT += sum(dz) over [r, start:stop]
    double* s2,                 # OUT += sum(dz * (x - mu))
) noexcept nogil:
    # the sums are over dz as stored, the values backward_input then reads
    cdef double a, b
    cdef floating g
    cdef Py_ssize_t i, j, e
    j = start
    while j < stop:
        e = min(j + BLOCK, stop)
        a = 0.0
        b = 0.0
        for i in range(j, e):
            g = _dact(kind, dy[r, i], s[r, i], slope)
            gz[r, i] = g
            a += <double>g
            b += <double>g * (<double>x[r, i] - mu)
        s1[0] += a
        s2[0] += b
        j = e


cdef void _act_cols_dot(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] dy,  # IN  (M, C) rows
    const floating[:, ::1] s,   # IN  like dy: the saved output (or z)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] gz,        # OUT like dy (may be dy or s, not x): dz
    Py_ssize_t m0,              # IN  first row
    Py_ssize_t m1,              # IN  end row
    const double[::1] mu,       # IN  (C,)
    floating slope,             # IN
    double[:, :, ::1] acc,      # OUT acc[t, SUM1] += sum(dz), acc[t, SUM2] += sum(dz * (x - mu))
    Py_ssize_t t,               # IN  share; acc[t, BLOCK_SUM1:] are scratch
) noexcept nogil:
    # _cols_dot over dz = _dact(dy, s). Four rows at a time, dz is written
    # first, a row per loop, and then read back (from cache) by the sums: one
    # loop doing both, with four stores among its loads, needs more run-time
    # alias checks than gcc makes, and stays scalar.
    cdef Py_ssize_t C = x.shape[1], j, e, m, c, q
    cdef double g, g1, g2, g3
    cdef floating h
    j = m0
    while j < m1:
        e = min(j + ROWS, m1)
        for c in range(C):
            acc[t, BLOCK_SUM1, c] = 0.0
            acc[t, BLOCK_SUM2, c] = 0.0
        m = j
        while m + 4 <= e:
            for q in range(m, m + 4):
                for c in range(C):
                    gz[q, c] = _dact(kind, dy[q, c], s[q, c], slope)
            for c in range(C):
                g = <double>gz[m, c]
                g1 = <double>gz[m + 1, c]
                g2 = <double>gz[m + 2, c]
                g3 = <double>gz[m + 3, c]
                acc[t, BLOCK_SUM1, c] += (g + g1) + (g2 + g3)
                acc[t, BLOCK_SUM2, c] += ((g * (<double>x[m, c] - mu[c])
                                           + g1 * (<double>x[m + 1, c] - mu[c]))
                                          + (g2 * (<double>x[m + 2, c] - mu[c])
                                             + g3 * (<double>x[m + 3, c] - mu[c])))
            m += 4
        while m < e:
            for c in range(C):
                h = _dact(kind, dy[m, c], s[m, c], slope)
                gz[m, c] = h
                acc[t, BLOCK_SUM1, c] += <double>h
                acc[t, BLOCK_SUM2, c] += h * (<double>x[m, c] - mu[c])
            m += 1
        for c in range(C):
            acc[t, SUM1, c] += acc[t, BLOCK_SUM1, c]
            acc[t, SUM2, c] += acc[t, BLOCK_SUM2, c]
        j = e


# ---------------------------------------------------------------------------
# the work split
#
# The helpers that divide indices carry @cython.cdivision(True). The module
# default turns cdivision off in the checked build (SYNCBN_CYTHON_CHECKS=1, see
# setup.py), where Cython gives // and % Python's floor semantics plus a test
# for a zero divisor. Here every operand is >= 0 and every divisor >= 1 (the
# kernels return before splitting an empty tensor), so C division gives the
# same numbers, and both builds run the same index arithmetic; besides, a
# noexcept nogil function cannot raise the ZeroDivisionError: Cython would
# only print it as unraisable and return 0.
# ---------------------------------------------------------------------------

cdef int _threads(int requested, Py_ssize_t work, Py_ssize_t parts) noexcept nogil:
    """Thread count: requested (0 = OpenMP default), capped by work and parts."""
    cdef int t = requested if requested > 0 else syncbn_max_threads()
    cdef Py_ssize_t by_work = work // GRAIN
    if by_work < t:
        t = <int>by_work
    if parts < t:
        t = <int>parts
    return t if t > 0 else 1


@cython.cdivision(True)    # (see the top of this section)
cdef Py_ssize_t _pieces(Py_ssize_t runs, Py_ssize_t L, int nt) noexcept nogil:
    """Pieces per run S: 1 with one thread or at least 8 runs per thread; else
    enough for about 8 pieces per thread in all, but at most ceil(L / MIN_PIECE)."""
    if nt <= 1 or runs >= 8 * nt:
        return 1
    cdef Py_ssize_t s = (8 * nt + runs - 1) // runs
    cdef Py_ssize_t most = (L + MIN_PIECE - 1) // MIN_PIECE
    return s if s < most else most


@cython.cdivision(True)    # (see the top of this section)
cdef Py_ssize_t _piece_len(Py_ssize_t L, Py_ssize_t S) noexcept nogil:
    """Piece length: L / S rounded up to whole blocks of 16 values."""
    cdef Py_ssize_t p = (L + S - 1) // S
    return (p + 15) // 16 * 16


@cython.cdivision(True)    # (see the top of this section)
cdef inline Py_ssize_t _share(Py_ssize_t total, Py_ssize_t k, Py_ssize_t parts) noexcept nogil:
    """Start of share k when total items are dealt into parts contiguous shares."""
    return total // parts * k + min(k, total % parts)


cdef struct Split:
    int nt              # shares (threads)
    Py_ssize_t N        # N (channels-first) or M (rows)
    Py_ssize_t C
    Py_ssize_t L        # L, or 0 for rows
    Py_ssize_t S        # pieces per run (channels-first)
    Py_ssize_t P        # piece length (channels-first)
    Py_ssize_t units    # pieces (channels-first) or rows


cdef Split _split(cnp.ndarray x, int num_threads, Py_ssize_t work_per_value):
    """How to deal out the work on x among threads (see the module docstring)."""
    cdef Split sp
    cdef Py_ssize_t size = cnp.PyArray_SIZE(x)
    sp.N = cnp.PyArray_DIM(x, 0)
    sp.C = cnp.PyArray_DIM(x, 1)
    sp.L = cnp.PyArray_DIM(x, 2) if cnp.PyArray_NDIM(x) == 3 else 0
    if sp.L > 0:
        sp.nt = _threads(num_threads, work_per_value * size, size)
        sp.S = _pieces(sp.N * sp.C, sp.L, sp.nt)
        sp.P = _piece_len(sp.L, sp.S)
        sp.units = sp.N * sp.C * sp.S
    else:
        sp.nt = _threads(num_threads, work_per_value * size, sp.N)
        sp.S = 1
        sp.P = 0
        sp.units = sp.N
    return sp


cdef struct PieceWalk:
    # the pieces of one share of a channels-first split, in memory order
    Py_ssize_t k        # the current piece's number (unit): piece s of run r
    Py_ssize_t end      # the share's end (unit)
    Py_ssize_t r        # run, r = n * C + c
    Py_ssize_t c        # channel
    Py_ssize_t s        # piece of the run
    Py_ssize_t start    # the current piece is x[r, start:stop] (empty, start >= stop,
    Py_ssize_t stop     #   for a piece past L, which the rounding of P can leave)


cdef inline void _piece_bounds(const Split* sp, PieceWalk* w) noexcept nogil:
    w.start = w.s * sp.P
    w.stop = min(w.start + sp.P, sp.L)


@cython.cdivision(True)    # (see the top of this section)
cdef inline PieceWalk _walk(const Split* sp, Py_ssize_t t) noexcept nogil:
    """The walk over share t's pieces, at its first; done when w.k == w.end."""
    cdef PieceWalk w
    w.k = _share(sp.units, t, sp.nt)
    w.end = _share(sp.units, t + 1, sp.nt)
    w.r = w.k // sp.S
    w.c = w.r % sp.C
    w.s = w.k % sp.S
    _piece_bounds(sp, &w)
    return w


cdef inline void _next_piece(const Split* sp, PieceWalk* w) noexcept nogil:
    """Step w to the next piece: the next of its run, or the first of the next run."""
    w.k += 1
    w.s += 1
    if w.s == sp.S:
        w.s = 0
        w.r += 1
        w.c += 1
        if w.c == sp.C:
            w.c = 0
    _piece_bounds(sp, w)


cdef object _partials(const Split* sp):
    """Zeroed per-share partial sums, (nt + 1, ACC_ROWS, >= C + 8): each row padded
    by at least 8 values (a cache line), so no two shares write to the same line;
    [nt, SUM1] is left for a per-channel vector."""
    cdef cnp.npy_intp dims[3]
    dims[0] = sp.nt + 1
    dims[1] = ACC_ROWS
    dims[2] = (sp.C + 7) // 8 * 8 + 8
    return cnp.PyArray_ZEROS(3, dims, cnp.NPY_FLOAT64, 0)


cdef object _coefs(Py_ssize_t C, int typenum):
    """Uninitialized (COEF_ROWS, C) coefficients of an affine pass (see _affine_run)."""
    cdef cnp.npy_intp dims[2]
    dims[0] = COEF_ROWS
    dims[1] = C
    return cnp.PyArray_EMPTY(2, dims, typenum, 0)


cdef object _float_coefs(const double[:, ::1] exact, bint two):
    """The coefficients of an affine pass on float32 data.

    ``exact`` holds m = the mean, a, b and k in float64 (rows COEF_MEAN ...).
    The pass computes ``(x - m) * a + k`` (or ``dy * a + ((x - m) * b + k)``)
    in the dtype of the data: for float32 that keeps the loop in float
    arithmetic (twice the lanes of double), with no conversions. A large
    |mean| costs no accuracy: m is rounded to m' = float32(m) first and k moved
    to k' = k + (m' - m) * (coefficient of x - m) in float64, so the loop
    subtracts m' where it would subtract m: x - m' is exact when x is within a
    factor 2 of m' (Sterbenz), otherwise rounded by 2^-24 relative to
    |x - m'|, not to |x|. The output is within a few float32 ulps of
    max(|out|, |k'|, |(x - m') * coefficient|). (float64 data takes the
    coefficients as they are.)
    """
    cdef Py_ssize_t C = exact.shape[1], c
    cdef double m
    coef = _coefs(C, cnp.NPY_FLOAT32)
    cdef float[:, ::1] cf = coef
    cdef Py_ssize_t xmu = COEF_XMU if two else COEF_SCALE    # the coefficient of x - m
    for c in range(C):
        m = <double><float>exact[COEF_MEAN, c]
        cf[COEF_MEAN, c] = <float>m
        cf[COEF_SCALE, c] = <float>exact[COEF_SCALE, c]
        cf[COEF_XMU, c] = <float>exact[COEF_XMU, c]
        cf[COEF_OFFSET, c] = <float>(exact[COEF_OFFSET, c]
                                     + (m - exact[COEF_MEAN, c]) * exact[xmu, c])
    return coef


# ---------------------------------------------------------------------------
# 1. local statistics and 3. backward reductions (see _run_sums):
#    dot False: acc[t, SUM1] += sum(x - pivot), acc[t, SUM2] += sum((x - pivot)^2)
#    dot True:  acc[t, SUM1] += sum(dy),        acc[t, SUM2] += sum(dy * (x - mean))
# ---------------------------------------------------------------------------

@cython.cdivision(True)    # (see "the work split")
cdef void _sums_share(
    const floating[:, ::1] dy,  # IN  runs (N * C, L) or rows (M, C); read only when dot
    const floating[:, ::1] x,   # IN  like dy
    const Split* sp,            # IN
    const double[::1] ref,      # IN  (C,) the pivot, or the mean when dot
    bint dot,                   # IN  the backward's sums
    double[:, :, ::1] acc,      # OUT (nt, ACC_ROWS, >= C) partial sums, zeroed
    Py_ssize_t t,               # IN  share
) noexcept nogil:
    cdef Py_ssize_t N = sp.N, C = sp.C, L = sp.L
    cdef Py_ssize_t k, k1, c, n, r, m
    cdef double a, b
    cdef PieceWalk w
    if L == 0:
        k = _share(sp.units, t, sp.nt)
        k1 = _share(sp.units, t + 1, sp.nt)
        if dot:
            _cols_dot(dy, x, k, k1, ref, acc, t)
        else:
            _cols_moments(x, k, k1, ref, acc, t)
    elif L >= STREAM_MIN_L or sp.S > 1:
        # memory order, piece by piece
        w = _walk(sp, t)
        while w.k < w.end:
            if w.start < w.stop:
                a = 0.0
                b = 0.0
                _run_sums(dy, x, w.r, w.start, w.stop, ref[w.c], dot, &a, &b)
                acc[t, SUM1, w.c] += a
                acc[t, SUM2, w.c] += b
            _next_piece(sp, &w)
    else:
        # channel by channel, k = c * N + n: the runs n .. n + m of channel c
        k = _share(sp.units, t, sp.nt)
        k1 = _share(sp.units, t + 1, sp.nt)
        c = k // N
        n = k % N
        while k < k1:
            m = min(k1 - k, N - n)
            a = 0.0
            b = 0.0
            for r in range(n, n + m):
                _run_sums(dy, x, r * C + c, 0, L, ref[c], dot, &a, &b)
            acc[t, SUM1, c] += a
            acc[t, SUM2, c] += b
            k += m
            n = 0
            c += 1


cdef void _sums(
    const floating[:, ::1] dy,  # IN  runs (N * C, L) or rows (M, C); read only when dot
    const floating[:, ::1] x,   # IN  like dy
    const Split* sp,            # IN
    const double[::1] ref,      # IN  (C,) the pivot, or the mean when dot
    bint dot,                   # IN  the backward's sums
    double[:, :, ::1] acc,      # TMP (nt, ACC_ROWS, >= C) zeroed
    double[::1] out,            # OUT (>= 2C,) out[:C], out[C:2C] += the sums, zeroed
) noexcept nogil:
    cdef Py_ssize_t C = sp.C, c, t
    if sp.nt == 1:
        # no parallel region: even a one-thread team costs microseconds
        _sums_share(dy, x, sp, ref, dot, acc, 0)
    else:
        for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
            _sums_share(dy, x, sp, ref, dot, acc, t)
    for t in range(sp.nt):
        for c in range(C):
            out[c] += acc[t, SUM1, c]
            out[C + c] += acc[t, SUM2, c]


# _act_sums_share and _act_sums are _sums_share and _sums over dz (the dot
# form only): the same split and walk, written a second time so that the
# plain reductions keep exactly the code they had (see _cols_dot on how
# sensitive gcc's code for _sums_share is to what is inlined into it).
@cython.cdivision(True)    # (see "the work split")
cdef void _act_sums_share(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] dy,  # IN  runs (N * C, L) or rows (M, C)
    const floating[:, ::1] s,   # IN  like dy: the saved output (or z)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] gz,        # OUT like dy: dz
    const Split* sp,            # IN
    const double[::1] mu,       # IN  (C,) the mean
    floating slope,             # IN  leaky_relu's negative slope
    double[:, :, ::1] acc,      # OUT (nt, ACC_ROWS, >= C) partial sums, zeroed
    Py_ssize_t t,               # IN  share
) noexcept nogil:
    cdef Py_ssize_t N = sp.N, C = sp.C, L = sp.L
    cdef Py_ssize_t k, k1, c, n, r, m
    cdef double a, b
    cdef PieceWalk w
    if L == 0:
        _act_cols_dot(kind, dy, s, x, gz, _share(sp.units, t, sp.nt),
                      _share(sp.units, t + 1, sp.nt), mu, slope, acc, t)
    elif L >= STREAM_MIN_L or sp.S > 1:
        # memory order, piece by piece
        w = _walk(sp, t)
        while w.k < w.end:
            if w.start < w.stop:
                a = 0.0
                b = 0.0
                _act_run_sums(kind, dy, s, x, gz, w.r, w.start, w.stop, mu[w.c], slope, &a, &b)
                acc[t, SUM1, w.c] += a
                acc[t, SUM2, w.c] += b
            _next_piece(sp, &w)
    else:
        # channel by channel, k = c * N + n: the runs n .. n + m of channel c
        k = _share(sp.units, t, sp.nt)
        k1 = _share(sp.units, t + 1, sp.nt)
        c = k // N
        n = k % N
        while k < k1:
            m = min(k1 - k, N - n)
            a = 0.0
            b = 0.0
            for r in range(n, n + m):
                _act_run_sums(kind, dy, s, x, gz, r * C + c, 0, L, mu[c], slope, &a, &b)
            acc[t, SUM1, c] += a
            acc[t, SUM2, c] += b
            k += m
            n = 0
            c += 1


cdef void _act_sums(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] dy,  # IN  runs (N * C, L) or rows (M, C)
    const floating[:, ::1] s,   # IN  like dy: the saved output (or z)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] gz,        # OUT like dy: dz
    const Split* sp,            # IN
    const double[::1] mu,       # IN  (C,) the mean
    floating slope,             # IN  leaky_relu's negative slope
    double[:, :, ::1] acc,      # TMP (nt, ACC_ROWS, >= C) zeroed
    double[::1] out,            # OUT (>= 2C,) out[:C], out[C:2C] += sum(dz), sum(dz * (x - mu))
) noexcept nogil:
    cdef Py_ssize_t C = sp.C, c, t
    if sp.nt == 1:
        _act_sums_share(kind, dy, s, x, gz, sp, mu, slope, acc, 0)
    else:
        for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
            _act_sums_share(kind, dy, s, x, gz, sp, mu, slope, acc, t)
    for t in range(sp.nt):
        for c in range(C):
            out[c] += acc[t, SUM1, c]
            out[C + c] += acc[t, SUM2, c]


cdef void _act_sums_any(
    int activation,             # IN  ACT_* code, not ACT_NONE
    const floating[:, ::1] dy,  # IN  (as in _act_sums)
    const floating[:, ::1] s,   # IN
    const floating[:, ::1] x,   # IN
    floating[:, ::1] gz,        # OUT
    const Split* sp,            # IN
    const double[::1] mu,       # IN
    floating slope,             # IN
    double[:, :, ::1] acc,      # TMP
    double[::1] out,            # OUT
) noexcept nogil:
    """_act_sums with the activation of a code."""
    if activation == _ACT_RELU:
        _act_sums(_RELU, dy, s, x, gz, sp, mu, slope, acc, out)
    elif activation == _ACT_RELU6:
        _act_sums(_RELU6, dy, s, x, gz, sp, mu, slope, acc, out)
    elif activation == _ACT_LEAKY_RELU:
        _act_sums(_LEAKY_RELU, dy, s, x, gz, sp, mu, slope, acc, out)
    elif activation == _ACT_SILU:
        _act_sums(_SILU, dy, s, x, gz, sp, mu, slope, acc, out)
    else:
        _act_sums(_NO_ACTIVATION, dy, s, x, gz, sp, mu, slope, acc, out)


def local_stats(
    x,                      # IN  (N, C, L) or (M, C), float32/float64, C-contiguous
    shift,                  # IN  (C,) float64: common shift, the same on every rank
    out,                    # OUT (2C + 1,) float64: [sum(x-shift), sum((x-shift)^2), count]
    int num_threads=0,
):
    """Per-channel sums of ``x - shift`` and of its square, and the count.

    Writes ``out[:C] = sum(x - shift)``, ``out[C:2C] = sum((x - shift)**2)``
    and ``out[2C] = number of values per channel`` (float64), the packed
    layout a SUM allreduce combines across ranks.

    Each channel is first accumulated around a local pivot, its first value
    (0 if that is not finite), and the sums are then moved to ``shift`` in
    float64. The variance they give, ``out[C+c]/n - (out[c]/n)**2``, has a
    relative error of about 1e-16 times
    ``((mean - shift)**2 + (pivot - mean)**2) / var``: a large ``|mean| / std``
    costs nothing by itself, a shift far from the mean does (finish_stats
    then asks for a second pass), and so would a first value many standard
    deviations away from the mean. The count is exact. Empty input gives zeros.
    """
    cdef Py_ssize_t C = _check_data("x", x)
    cdef const double* sh = _ptr(_vec("shift", shift, C))
    cdef double[::1] o = _vec("out", out, 2 * C + 1, False, True)
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef Py_ssize_t count = cnp.PyArray_SIZE(a) // C if C > 0 else 0
    cdef Py_ssize_t c
    cdef double d, v, n = <double>count
    cdef Split sp
    cdef double[::1] piv
    cdef double[:, :, ::1] acc
    cdef const float[:, ::1] xf
    cdef const double[:, ::1] xd
    cdef bint single = cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32
    for c in range(2 * C):
        o[c] = 0.0
    o[2 * C] = n
    if count == 0:
        return
    sp = _split(a, num_threads, 1)
    acc = _partials(&sp)
    piv = acc[sp.nt, SUM1, :C]     # the spare row of _partials
    if single:
        xf = _rows(a)
    else:
        xd = _rows(a)
    with nogil:
        # the pivot: the first value of each channel (run c, or column c of row 0)
        for c in range(C):
            if single:
                v = <double>(xf[c, 0] if sp.L > 0 else xf[0, c])
            else:
                v = xd[c, 0] if sp.L > 0 else xd[0, c]
            # a non-finite pivot would turn every x - pivot into NaN (inf - inf),
            # even where the true sums are +-inf; 0 lets them come out as they should
            piv[c] = v if isfinite(v) else 0.0
        if single:
            _sums(xf, xf, &sp, piv, False, acc, o)
        else:
            _sums(xd, xd, &sp, piv, False, acc, o)
        # move from the pivot p to the common shift s: with d = p - s,
        # sum(x - s) = S1 + n d,  sum((x - s)^2) = S2 + 2 d S1 + n d^2
        for c in range(C):
            d = piv[c] - sh[c]
            if d != 0.0:    # (and an infinite sum stays as it is)
                o[C + c] = o[C + c] + d * (2.0 * o[c] + n * d)
                o[c] = o[c] + n * d


cdef int _reduce_pass(cnp.ndarray dy, cnp.ndarray x, const double[::1] mu, int activation,
                      double negative_slope, object saved, object grad_preact, double[::1] out,
                      int num_threads) except -1:
    """backward_reduce's pass on validated, non-empty arguments (local_backward's
    on rows too): out[:C], out[C:2C] += sum(dz), sum(dz * (x - mean)), with
    dz = dy, or with an activation dy * activation'(.) written to grad_preact."""
    cdef Split sp = _split(x, num_threads, 2)
    cdef double[:, :, ::1] acc = _partials(&sp)
    cdef const float[:, ::1] gf, xf, sf
    cdef const double[:, ::1] gd, xd, sd
    cdef float[:, ::1] pf
    cdef double[:, ::1] pd
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        gf = _rows(dy)
        xf = _rows(x)
        if activation == _ACT_NONE:
            with nogil:
                _sums(gf, xf, &sp, mu, True, acc, out)
        else:
            sf = _rows(<cnp.ndarray>saved)
            pf = _rows(<cnp.ndarray>grad_preact)
            with nogil:
                _act_sums_any(activation, gf, sf, xf, pf, &sp, mu, <float>negative_slope,
                              acc, out)
    else:
        gd = _rows(dy)
        xd = _rows(x)
        if activation == _ACT_NONE:
            with nogil:
                _sums(gd, xd, &sp, mu, True, acc, out)
        else:
            sd = _rows(<cnp.ndarray>saved)
            pd = _rows(<cnp.ndarray>grad_preact)
            with nogil:
                _act_sums_any(activation, gd, sd, xd, pd, &sp, mu, negative_slope, acc, out)
    return 0


def backward_reduce(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    out,                    # OUT (2C,) float64: [sum(dz), sum(dz * (x - mean))], dz = dy unless activation
    int num_threads=0,
    invstd=None,            # IN  (C,) float64; needed with grad_weight
    grad_weight=None,       # OUT (C,) float32/float64 or None: sum(dz * (x - mean)) * invstd
    grad_bias=None,         # OUT (C,) float32/float64 or None: sum(dz)
    *,
    int activation=ACT_NONE,   # IN  ACT_*: the forward's activation
    double negative_slope=0.01,  # IN  leaky_relu's
    saved=None,             # IN  like dy, with an activation: its output y, or z (see below)
    grad_preact=None,       # OUT like dy, with an activation: dz (may be dy or saved, not x)
):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass, float64.

    With ``grad_weight`` / ``grad_bias``, also writes the parameter gradients
    these sums give (this rank's, in the parameters' own dtype): the layer
    then needs no NumPy arithmetic of its own between the kernels.

    With an ``activation`` (the forward's, see normalize), dy is the gradient
    of the activation's output, and ``saved`` and ``grad_preact`` are
    required: ``saved`` holds the output y if ``activation_uses_output``,
    else z. The same pass writes ``dz = dy * activation'(.)`` to
    ``grad_preact`` (torch's backward formulas; the residual's gradient, and
    the dy to give backward_input), and the sums and parameter gradients are
    over dz. With ACT_NONE (the default) both must be None: dz is dy.
    """
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", <cnp.ndarray>dy)
    _check_fused_backward(<cnp.ndarray>dy, x, activation, saved, grad_preact)
    cdef const double[::1] mu = _vec("mean", mean, C)
    cdef double[::1] o = _vec("out", out, 2 * C, False, True)
    cdef FVec gw = _fvec("grad_weight", grad_weight, C, True)
    cdef FVec gb = _fvec("grad_bias", grad_bias, C, True)
    cdef const double* inv = _ptr(_vec("invstd", invstd, C, gw.data == NULL))
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef Py_ssize_t c
    for c in range(2 * C):
        o[c] = 0.0
    if cnp.PyArray_SIZE(a) > 0:
        _reduce_pass(<cnp.ndarray>dy, a, mu, activation, negative_slope, saved, grad_preact, o,
                     num_threads)
    for c in range(C):
        if gw.data != NULL:
            _fput(gw, c, o[C + c] * inv[c])
        if gb.data != NULL:
            _fput(gb, c, o[c])


# ---------------------------------------------------------------------------
# 2 and 4. per-channel affine passes
#    forward:  y  = (x - m) * a + k
#    backward: dx = dy * a + ((x - m) * b + k)
# ---------------------------------------------------------------------------

cdef void _affine_share(
    const floating[:, ::1] x,   # IN  runs (N * C, L) or rows (M, C)
    const floating[:, ::1] z,   # IN  like x (read only when two)
    floating[:, ::1] out,       # OUT like x
    const Split* sp,            # IN
    const floating[:, ::1] coef,  # IN  (COEF_ROWS, C) m, a, b, k (see _affine_run)
    bint two,                   # IN  the backward form
    Py_ssize_t t,               # IN  share
) noexcept nogil:
    cdef PieceWalk w
    if sp.L == 0:
        _affine_rows(x, z, out, _share(sp.units, t, sp.nt), _share(sp.units, t + 1, sp.nt),
                     coef, two)
        return
    # memory order, piece by piece
    w = _walk(sp, t)
    while w.k < w.end:
        if w.start < w.stop:
            _affine_run(x, z, out, w.r, w.start, w.stop, coef[COEF_MEAN, w.c],
                        coef[COEF_SCALE, w.c], coef[COEF_XMU, w.c], coef[COEF_OFFSET, w.c],
                        two)
        _next_piece(sp, &w)


cdef void _affine(
    const floating[:, ::1] x,   # IN  runs (N * C, L) or rows (M, C)
    const floating[:, ::1] z,   # IN  like x (read only when two)
    floating[:, ::1] out,       # OUT like x
    const Split* sp,            # IN
    const floating[:, ::1] coef,  # IN  (COEF_ROWS, C)
    bint two,                   # IN  the backward form
) noexcept nogil:
    cdef Py_ssize_t t
    if sp.nt == 1:
        _affine_share(x, z, out, sp, coef, two, 0)
        return
    for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
        _affine_share(x, z, out, sp, coef, two, t)


cdef int _affine_pass(cnp.ndarray x, object z, cnp.ndarray out, const double[:, ::1] exact,
                      int num_threads) except -1:
    """Thread split and dtype dispatch of an affine pass (z None: the forward form);
    exact: the float64 coefficients (see _float_coefs)."""
    cdef Split sp = _split(x, num_threads, 1)
    cdef bint two = z is not None
    cdef bint single = cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32
    cdef const float[:, ::1] xf, zf, cf
    cdef float[:, ::1] of
    cdef const double[:, ::1] xd, zd, cd
    cdef double[:, ::1] od
    if single:
        cf = _float_coefs(exact, two)
        xf = _rows(x)
        zf = _rows(z) if two else xf
        of = _rows(out)
        with nogil:
            _affine(xf, zf, of, &sp, cf, two)
    else:
        cd = exact
        xd = _rows(x)
        zd = _rows(z) if two else xd
        od = _rows(out)
        with nogil:
            _affine(xd, zd, od, &sp, cd, two)
    return 0


cdef void _act_affine_share(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] x,   # IN  runs (N * C, L) or rows (M, C)
    const floating[:, ::1] res, # IN  like x (read only when has_res)
    floating[:, ::1] out,       # OUT like x
    floating[:, ::1] pre,       # OUT like x (written only when has_pre)
    const Split* sp,            # IN
    const floating[:, ::1] coef,  # IN  (COEF_ROWS, C) m, a, k (see _act_affine_run)
    floating slope,             # IN  leaky_relu's negative slope
    bint has_res,               # IN
    bint has_pre,               # IN
    Py_ssize_t t,               # IN  share
) noexcept nogil:
    cdef PieceWalk w
    if sp.L == 0:
        _act_affine_rows(kind, x, res, out, pre, _share(sp.units, t, sp.nt),
                         _share(sp.units, t + 1, sp.nt), coef, slope, has_res, has_pre)
        return
    # memory order, piece by piece
    w = _walk(sp, t)
    while w.k < w.end:
        if w.start < w.stop:
            _act_affine_run(kind, x, res, out, pre, w.r, w.start, w.stop,
                            coef[COEF_MEAN, w.c], coef[COEF_SCALE, w.c], coef[COEF_OFFSET, w.c],
                            slope, has_res, has_pre)
        _next_piece(sp, &w)


cdef void _act_affine(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] x,   # IN  (as in _act_affine_share)
    const floating[:, ::1] res, # IN
    floating[:, ::1] out,       # OUT
    floating[:, ::1] pre,       # OUT
    const Split* sp,            # IN
    const floating[:, ::1] coef,  # IN
    floating slope,             # IN
    bint has_res,               # IN
    bint has_pre,               # IN
) noexcept nogil:
    cdef Py_ssize_t t
    if sp.nt == 1:
        _act_affine_share(kind, x, res, out, pre, sp, coef, slope, has_res, has_pre, 0)
        return
    for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
        _act_affine_share(kind, x, res, out, pre, sp, coef, slope, has_res, has_pre, t)


cdef void _act_affine_any(
    int activation,             # IN  ACT_* code
    const floating[:, ::1] x,   # IN  (as in _act_affine_share)
    const floating[:, ::1] res, # IN
    floating[:, ::1] out,       # OUT
    floating[:, ::1] pre,       # OUT
    const Split* sp,            # IN
    const floating[:, ::1] coef,  # IN
    floating slope,             # IN
    bint has_res,               # IN
    bint has_pre,               # IN
) noexcept nogil:
    """_act_affine with the activation of a code."""
    if activation == _ACT_RELU:
        _act_affine(_RELU, x, res, out, pre, sp, coef, slope, has_res, has_pre)
    elif activation == _ACT_RELU6:
        _act_affine(_RELU6, x, res, out, pre, sp, coef, slope, has_res, has_pre)
    elif activation == _ACT_LEAKY_RELU:
        _act_affine(_LEAKY_RELU, x, res, out, pre, sp, coef, slope, has_res, has_pre)
    elif activation == _ACT_SILU:
        _act_affine(_SILU, x, res, out, pre, sp, coef, slope, has_res, has_pre)
    else:
        _act_affine(_NO_ACTIVATION, x, res, out, pre, sp, coef, slope, has_res, has_pre)


cdef int _act_affine_pass(cnp.ndarray x, object residual, cnp.ndarray out, object preact,
                          const double[:, ::1] exact, int activation, double slope,
                          int num_threads) except -1:
    """Thread split and dtype dispatch of a fused forward pass: out = activation(z),
    z = (x - m) * a + k [+ residual] [written to preact]; exact: the float64
    coefficients of the forward form (see _float_coefs)."""
    cdef Split sp = _split(x, num_threads, 1)
    cdef bint has_res = residual is not None
    cdef bint has_pre = preact is not None
    cdef const float[:, ::1] xf, rf, cf
    cdef float[:, ::1] of, pf
    cdef const double[:, ::1] xd, rd, cd
    cdef double[:, ::1] od, pd
    if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
        cf = _float_coefs(exact, False)
        xf = _rows(x)
        rf = _rows(residual) if has_res else xf
        of = _rows(out)
        pf = _rows(preact) if has_pre else of
        with nogil:
            _act_affine_any(activation, xf, rf, of, pf, &sp, cf, <float>slope, has_res, has_pre)
    else:
        cd = exact
        xd = _rows(x)
        rd = _rows(residual) if has_res else xd
        od = _rows(out)
        pd = _rows(preact) if has_pre else od
        with nogil:
            _act_affine_any(activation, xd, rd, od, pd, &sp, cd, slope, has_res, has_pre)
    return 0


def normalize(
    x,                      # IN  (N, C, L) or (M, C), float32/float64, C-contiguous
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float32/float64 or None (= 1)
    bias,                   # IN  (C,) float32/float64 or None (= 0)
    out,                    # OUT like x (may be x or residual itself)
    int num_threads=0,
    *,
    residual=None,          # IN  like x or None: added before the activation
    int activation=ACT_NONE,   # IN  ACT_*
    double negative_slope=0.01,  # IN  leaky_relu's
    preact=None,            # OUT like x or None (not out): z, the activation's input
):
    """``out = activation((x - mean) * invstd * weight + bias [+ residual])``, one pass.

    Weight and invstd are folded into one scale per channel, computed
    ``(x - mean) * scale + bias`` in the dtype of x, centred so that a large
    ``|mean|`` costs no accuracy (see _float_coefs): float32 output is within
    a few ulps of max(|out|, |bias'|, |(x - mean') * scale|), where mean' is
    mean rounded to float32 and bias' the bias corrected for that rounding.

    Fused, in the same pass: ``z = (x - mean) * scale + bias + residual``
    (residual added in the dtype of x, after the affine transform) and
    ``out = activation(z)``, each as torch computes it (NaN stays NaN;
    leaky_relu takes ``negative_slope``, silu is ``z / (1 + exp(-z))``).
    ``preact``, if given (with an activation), receives z: the backward needs
    it when ``activation_uses_output`` is False. Each value is read before its
    results are written, so out may be x or residual.
    """
    cdef Py_ssize_t C = _check_data("x", x)
    _check_same("out", out, "x", <cnp.ndarray>x, True)
    _check_fused_forward(<cnp.ndarray>x, out, residual, activation, preact)
    cdef const double* mu = _ptr(_vec("mean", mean, C))
    cdef const double* inv = _ptr(_vec("invstd", invstd, C))
    cdef FVec w = _fvec("weight", weight, C)
    cdef FVec b = _fvec("bias", bias, C)
    if cnp.PyArray_SIZE(<cnp.ndarray>x) == 0:
        return
    _normalize_pass(<cnp.ndarray>x, mu, inv, w, b, <cnp.ndarray>out, residual, activation,
                    negative_slope, preact, num_threads)


cdef int _normalize_pass(cnp.ndarray x, const double* mu, const double* inv, FVec w, FVec b,
                         cnp.ndarray out, object residual, int activation, double negative_slope,
                         object preact, int num_threads) except -1:
    """normalize's pass on validated arguments (local_forward's on rows too):
    the coefficients from the statistics and the affine parameters, then the
    plain or the fused affine pass."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(x, 1), c
    cdef double[:, ::1] coef = _coefs(C, cnp.NPY_FLOAT64)
    for c in range(C):
        coef[COEF_MEAN, c] = mu[c]
        coef[COEF_SCALE, c] = inv[c] * _fat(w, c, 1.0)
        coef[COEF_XMU, c] = 0.0
        coef[COEF_OFFSET, c] = _fat(b, c, 0.0)
    if residual is None and activation == _ACT_NONE:
        _affine_pass(x, None, out, coef, num_threads)
    else:
        _act_affine_pass(x, residual, out, preact, coef, activation, negative_slope, num_threads)
    return 0


def backward_input(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float32/float64 or None (= 1)
    sum_dy,                 # IN  (C,) float64: global sum(dy)
    sum_dy_xmu,             # IN  (C,) float64: global sum(dy * (x - mean))
    out,                    # OUT like x: gradient of the input (may be dy or x itself)
    int num_threads=0,
    double count=1.0,       # IN  the values per channel the sums ran over
):
    """``out = (dy - sum_dy / count - (x - mean) * invstd**2 * sum_dy_xmu / count) * invstd * weight``.

    The sums are the reduced buffer of backward_reduce and ``count`` the
    global count (with the default ``count=1``, pass the means instead).
    Folded into ``dy * a + ((x - mean) * b + k)`` per channel, one pass in the
    dtype of the data, centred as in normalize (see _float_coefs).
    """
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", <cnp.ndarray>dy)
    _check_same("out", out, "dy", <cnp.ndarray>dy, True)
    cdef const double* mu = _ptr(_vec("mean", mean, C))
    cdef const double* inv = _ptr(_vec("invstd", invstd, C))
    cdef FVec w = _fvec("weight", weight, C)
    cdef const double* mdy = _ptr(_vec("sum_dy", sum_dy, C))
    cdef const double* mdx = _ptr(_vec("sum_dy_xmu", sum_dy_xmu, C))
    if not count > 0.0:
        raise ValueError(f"count: expected a positive number (got {count})")
    if cnp.PyArray_SIZE(<cnp.ndarray>dy) == 0:
        return
    _input_grad_pass(<cnp.ndarray>dy, x, mu, inv, w, mdy, mdx, count, <cnp.ndarray>out,
                     num_threads)


cdef int _input_grad_pass(cnp.ndarray dy, object x, const double* mu, const double* inv, FVec w,
                          const double* sum_dy, const double* sum_dy_xmu, double count,
                          cnp.ndarray out, int num_threads) except -1:
    """backward_input's pass on validated arguments (count > 0; local_backward's
    on rows too): the coefficients from the sums, then the affine pass."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(dy, 1), c
    cdef double a
    cdef double[:, ::1] coef = _coefs(C, cnp.NPY_FLOAT64)
    for c in range(C):
        a = inv[c] * _fat(w, c, 1.0)
        coef[COEF_MEAN, c] = mu[c]
        coef[COEF_SCALE, c] = a
        coef[COEF_XMU, c] = -a * inv[c] * inv[c] * (sum_dy_xmu[c] / count)
        coef[COEF_OFFSET, c] = -a * (sum_dy[c] / count)
    _affine_pass(dy, x, out, coef, num_threads)
    return 0


# ---------------------------------------------------------------------------
# 5. from the reduced sums to the statistics, in one call (the per-channel
#    glue of the layer: a dozen numpy operations of a microsecond or more
#    each, replaced by one loop)
# ---------------------------------------------------------------------------

cdef void _lerp(FVec buf, const double* target, double scale, double factor,
                Py_ssize_t C) noexcept:
    """``buf = (1 - factor) * buf + factor * target * scale`` (a running statistic).

    The formula torch uses: with factor < 1 an infinite buffer stays infinite
    (a lerp, buf + factor * (target - buf), would turn it into NaN).
    """
    cdef Py_ssize_t c
    cdef double keep = 1.0 - factor
    if buf.data == NULL:
        return
    if buf.single:
        for c in range(C):
            (<float*>buf.data)[c] = <float>(keep * (<float*>buf.data)[c]
                                            + factor * (target[c] * scale))
    else:
        for c in range(C):
            (<double*>buf.data)[c] = keep * (<double*>buf.data)[c] + factor * (target[c] * scale)


# IEEE division in both builds (the checked build's default is Python's, which
# raises ZeroDivisionError): with eps = 0 a constant channel's invstd is
# 1 / sqrt(0) = inf, as in torch, not an exception.
@cython.cdivision(True)
cdef void _record_batch(
    const double* mean,         # IN  (C,) the batch's mean
    const double* var,          # IN  (C,) its biased variance
    double n,                   # IN  its count per channel
    Py_ssize_t C,               # IN
    double* next_shift,         # OUT (C,) or NULL: the mean where finite
    FVec running_mean,          # IN/OUT or None
    FVec running_var,           # IN/OUT or None (unbiased variance)
    int64_t* batches,           # IN/OUT or NULL: += 1
    double factor,              # IN  weight of this batch in the running statistics
    bint cumulative,            # IN  instead: 1 / batches seen (momentum None)
) noexcept:
    """What finishing a batch writes besides its statistics: the next shift,
    the batch counter and the running statistics (torch's formula)."""
    cdef Py_ssize_t c
    cdef double f = factor
    if next_shift != NULL:
        for c in range(C):
            if isfinite(mean[c]):
                next_shift[c] = mean[c]
    if batches != NULL:
        batches[0] += 1
        if cumulative:
            f = 1.0 / <double>batches[0]
    _lerp(running_mean, mean, 1.0, f, C)
    _lerp(running_var, var, n / (n - 1.0) if n > 1.0 else INFINITY, f, C)


def finish_stats(
    sums,                   # IN  (2C + 1,) float64: local_stats' output, reduced over ranks
    shift,                  # IN  (C,) float64: the shift the sums were taken around
    double eps,             # IN
    stats,                  # OUT (3, C) float64: mean, invstd, biased variance
    bint refine=True,       # IN  may ask for a second pass (see below)
    next_shift=None,        # OUT (C,) float64 or None: the mean where finite
    running_mean=None,      # IN/OUT (C,) float32/float64 or None: running statistics
    running_var=None,       # IN/OUT like running_mean (unbiased variance)
    factor=0.0,             # IN  weight of this batch in the running statistics;
                            #     None: 1 / batches seen (a cumulative average)
    num_batches_tracked=None,  # IN/OUT int64 array of one element or None: += 1
):
    """Mean, invstd and variance from the reduced sums; running statistics.

    Returns True, having written only ``stats[0]`` (the better shift), when
    ``refine`` is set and for some channel ``(mean - shift)^2 > REFINE * var``
    (REFINE = 1e6): the variance would then keep fewer than about 10 digits, so the caller
    sums again around ``stats[0]`` and calls back with ``refine=False``. The
    test uses reduced values only, so every rank decides alike as long as
    the allreduce gives every rank the same bits.

    Otherwise writes the statistics, copies the finite means to
    ``next_shift``, counts the batch in ``num_batches_tracked``, updates
    ``running_mean`` / ``running_var`` with torch's formula (``var * n / (n - 1)``
    for the variance; ``factor`` None: ``1 / num_batches_tracked``, 0 without
    a counter), and returns False.
    The count ``sums[2C]`` must be at least 1 (the caller handles 0).

    (Per-channel loops over validated raw pointers: acquiring a typed
    memoryview costs about a microsecond, as much as these loops.)
    """
    if (not isinstance(stats, np.ndarray) or cnp.PyArray_NDIM(<cnp.ndarray>stats) != 2
            or cnp.PyArray_DIM(<cnp.ndarray>stats, 0) != 3
            or cnp.PyArray_TYPE(<cnp.ndarray>stats) != cnp.NPY_FLOAT64
            or cnp.PyArray_ISBYTESWAPPED(<cnp.ndarray>stats)):
        raise TypeError(f"stats: expected a (3, C) float64 numpy.ndarray (got {_describe(stats)})")
    _check_layout("stats", <cnp.ndarray>stats, True)
    cdef Py_ssize_t C = cnp.PyArray_DIM(<cnp.ndarray>stats, 1)
    cdef double* mean = <double*>cnp.PyArray_DATA(<cnp.ndarray>stats)
    cdef double* invstd = mean + C
    cdef double* var = mean + 2 * C
    cdef const double* s = _ptr(_vec("shift", shift, C))
    cdef const double* b = _ptr(_vec("sums", sums, 2 * C + 1))
    cdef double* nxt = _ptr(_vec("next_shift", next_shift, C, True, True))
    cdef FVec rm = _fvec("running_mean", running_mean, C, True)
    cdef FVec rv = _fvec("running_var", running_var, C, True)
    cdef int64_t* batches = _counter("num_batches_tracked", num_batches_tracked)
    cdef double f = 0.0 if factor is None else <double>factor
    cdef double n = b[2 * C], d, v
    cdef Py_ssize_t c
    cdef bint far = False
    if not n >= 1.0:
        raise ValueError(f"sums: expected a count of at least 1 (got {n})")
    # plain per-channel loops; with setup.py's flags gcc vectorizes the two copy
    # loops (far: mean; next_shift), not the division and square-root loops
    # (sqrt may set errno)
    for c in range(C):
        d = b[c] / n                                # mean - shift
        v = b[C + c] / n - d * d
        mean[c] = s[c] + d
        var[c] = v if (v > 0.0 or v != v) else 0.0  # (NaN stays NaN)
    if refine:
        for c in range(C):
            d = b[c] / n                            # mean - shift, as above
            if isfinite(d) and d * d > _REFINE * var[c]:
                far = True
                break
    if far:
        for c in range(C):
            d = b[c] / n
            mean[c] = s[c] + d if isfinite(d) else s[c]
        return True
    for c in range(C):
        invstd[c] = 1.0 / sqrt(var[c] + eps)
    _record_batch(mean, var, n, C, nxt, rm, rv, batches, f, factor is None)
    return False


# ---------------------------------------------------------------------------
# 6. a group of one process. With no allreduce between the passes, each
#    channel's statistics and normalization (forward), or its reduction and
#    input gradient (backward), run back to back while the channel's values
#    are still in cache: one call per pass, and the second reading of the
#    data costs little. Rows (channels-last, 2-D) interleave the channels,
#    so there each pass covers every channel: the statistics pass of 1, then
#    the pass of 2 (forward), or the reduction of 3, then the pass of 4
#    (backward), in the same one call.
# ---------------------------------------------------------------------------

# (index division as in "the work split"; IEEE float division as in finish_stats)
@cython.cdivision(True)
cdef inline void _channel_stats(
    const floating[:, ::1] x,   # IN  runs (N * C, L)
    Py_ssize_t N,               # IN
    Py_ssize_t c,               # IN  channel
    double eps,                 # IN
    double* stats,              # OUT (3, C): mean, invstd, biased variance (column c)
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[0] // N, L = x.shape[1], n
    cdef double count = <double>(N * L), p, s1, s2, d, v
    cdef int attempt
    # sums around a pivot inside the data (the channel's first value), then,
    # if it was far from the mean, once more around the mean (see local_stats)
    p = <double>x[c, 0]
    if not isfinite(p):
        p = 0.0
    for attempt in range(2):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            _run_sums(x, x, n * C + c, 0, L, p, False, &s1, &s2)
        d = s1 / count
        v = s2 / count - d * d
        v = v if (v > 0.0 or v != v) else 0.0   # (NaN stays NaN)
        if not (isfinite(d) and d * d > _REFINE * v):
            break
        p = p + d
    stats[c] = p + d
    stats[C + c] = 1.0 / sqrt(v + eps)
    stats[2 * C + c] = v


# (index division as in "the work split")
@cython.cdivision(True)
cdef void _local_forward_channel(
    const floating[:, ::1] x,   # IN  runs (N * C, L)
    floating[:, ::1] out,       # OUT like x
    Py_ssize_t N,               # IN
    Py_ssize_t c,               # IN  channel
    double eps,                 # IN
    double weight,              # IN  of channel c
    double bias,                # IN  of channel c
    double* stats,              # OUT (3, C): mean, invstd, biased variance
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[0] // N, L = x.shape[1], n
    cdef double mean, a, k
    cdef floating m
    _channel_stats(x, N, c, eps, stats)
    # the normalization in the dtype of the data, centred (see _float_coefs)
    mean = stats[c]
    a = stats[C + c] * weight
    m = <floating>mean
    k = bias + (<double>m - mean) * a
    for n in range(N):
        _affine_run(x, x, out, n * C + c, 0, L, m, <floating>a, <floating>0.0, <floating>k, False)


# (index division as in "the work split")
@cython.cdivision(True)
cdef void _act_local_forward_channel(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] x,   # IN  runs (N * C, L)
    const floating[:, ::1] res, # IN  like x (read only when has_res)
    floating[:, ::1] out,       # OUT like x: activation(z)
    floating[:, ::1] pre,       # OUT like x: z (written only when has_pre)
    Py_ssize_t N,               # IN
    Py_ssize_t c,               # IN  channel
    double eps,                 # IN
    double weight,              # IN  of channel c
    double bias,                # IN  of channel c
    floating slope,             # IN  leaky_relu's negative slope
    bint has_res,               # IN
    bint has_pre,               # IN
    double* stats,              # OUT (3, C): mean, invstd, biased variance
) noexcept nogil:
    # _local_forward_channel with the fused loop of normalize
    cdef Py_ssize_t C = x.shape[0] // N, L = x.shape[1], n
    cdef double mean, a, k
    cdef floating m
    _channel_stats(x, N, c, eps, stats)
    mean = stats[c]
    a = stats[C + c] * weight
    m = <floating>mean
    k = bias + (<double>m - mean) * a
    for n in range(N):
        _act_affine_run(kind, x, res, out, pre, n * C + c, 0, L, m, <floating>a, <floating>k,
                        slope, has_res, has_pre)


# (index division as in "the work split"; IEEE float division as in finish_stats)
@cython.cdivision(True)
cdef inline void _channel_input_grad(
    const floating[:, ::1] dy,  # IN  runs (N * C, L): dy, or dz with an activation
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] out,       # OUT like dy (may be dy or x)
    Py_ssize_t N,               # IN
    Py_ssize_t c,               # IN  channel
    double mean,                # IN  of channel c
    double invstd,              # IN  of channel c
    double weight,              # IN  of channel c
    double s1,                  # IN  sum(dy) over channel c
    double s2,                  # IN  sum(dy * (x - mean)) over channel c
) noexcept nogil:
    cdef Py_ssize_t C = dy.shape[0] // N, L = dy.shape[1], n
    cdef double count = <double>(N * L), a, b, k
    cdef floating m
    # out = dy * a + ((x - mean) * b + k), centred as in backward_input
    a = invstd * weight
    b = -a * invstd * invstd * (s2 / count)
    k = -a * (s1 / count)
    m = <floating>mean
    k = k + (<double>m - mean) * b
    for n in range(N):
        _affine_run(dy, x, out, n * C + c, 0, L, m, <floating>a, <floating>b, <floating>k, True)


# (index division as in "the work split")
@cython.cdivision(True)
cdef void _local_backward_channel(
    const floating[:, ::1] dy,  # IN  runs (N * C, L)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] out,       # OUT like dy, written when grad_input
    Py_ssize_t N,               # IN
    Py_ssize_t c,               # IN  channel
    double mean,                # IN  of channel c
    double invstd,              # IN  of channel c
    double weight,              # IN  of channel c
    bint grad_input,            # IN  write out
    double* sums,               # OUT (2C,): [sum(dy), sum(dy * (x - mean))]
) noexcept nogil:
    cdef Py_ssize_t C = dy.shape[0] // N, L = dy.shape[1], n
    cdef double s1 = 0.0, s2 = 0.0
    for n in range(N):
        _run_sums(dy, x, n * C + c, 0, L, mean, True, &s1, &s2)
    sums[c] = s1
    sums[C + c] = s2
    if grad_input:
        _channel_input_grad(dy, x, out, N, c, mean, invstd, weight, s1, s2)


# (index division as in "the work split")
@cython.cdivision(True)
cdef void _act_local_backward_channel(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] dy,  # IN  runs (N * C, L)
    const floating[:, ::1] s,   # IN  like dy: the saved output (or z)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] gz,        # OUT like dy (not x): dz
    floating[:, ::1] out,       # OUT like dy (may be gz, dy, s or x), written when grad_input
    Py_ssize_t N,               # IN
    Py_ssize_t c,               # IN  channel
    double mean,                # IN  of channel c
    double invstd,              # IN  of channel c
    double weight,              # IN  of channel c
    floating slope,             # IN  leaky_relu's negative slope
    bint grad_input,            # IN  write out
    double* sums,               # OUT (2C,): [sum(dz), sum(dz * (x - mean))]
) noexcept nogil:
    # dz and its sums in one pass over the channel, then the input gradient
    # from dz as stored (channel c's dy and s are read before any of out is written)
    cdef Py_ssize_t C = dy.shape[0] // N, L = dy.shape[1], n
    cdef double s1 = 0.0, s2 = 0.0
    for n in range(N):
        _act_run_sums(kind, dy, s, x, gz, n * C + c, 0, L, mean, slope, &s1, &s2)
    sums[c] = s1
    sums[C + c] = s2
    if grad_input:
        _channel_input_grad(gz, x, out, N, c, mean, invstd, weight, s1, s2)


cdef void _local_forward_channels(
    const floating[:, ::1] x,   # IN  runs (N * C, L)
    floating[:, ::1] out,       # OUT like x
    Py_ssize_t N,               # IN
    double eps,                 # IN
    FVec w,                     # IN  weight or None
    FVec b,                     # IN  bias or None
    double* stats,              # OUT (3, C)
    int nt,                     # IN  threads
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[0] // N, c
    if nt == 1:
        # no parallel region: even a one-thread team costs microseconds
        for c in range(C):
            _local_forward_channel(x, out, N, c, eps, _fat(w, c, 1.0), _fat(b, c, 0.0), stats)
    else:
        for c in prange(C, num_threads=nt, schedule='static'):
            _local_forward_channel(x, out, N, c, eps, _fat(w, c, 1.0), _fat(b, c, 0.0), stats)


cdef void _act_local_forward_channels(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] x,   # IN  runs (N * C, L)
    const floating[:, ::1] res, # IN  like x (read only when has_res)
    floating[:, ::1] out,       # OUT like x
    floating[:, ::1] pre,       # OUT like x (written only when has_pre)
    Py_ssize_t N,               # IN
    double eps,                 # IN
    FVec w,                     # IN  weight or None
    FVec b,                     # IN  bias or None
    floating slope,             # IN
    bint has_res,               # IN
    bint has_pre,               # IN
    double* stats,              # OUT (3, C)
    int nt,                     # IN  threads
) noexcept nogil:
    cdef Py_ssize_t C = x.shape[0] // N, c
    if nt == 1:
        for c in range(C):
            _act_local_forward_channel(kind, x, res, out, pre, N, c, eps, _fat(w, c, 1.0),
                                       _fat(b, c, 0.0), slope, has_res, has_pre, stats)
    else:
        for c in prange(C, num_threads=nt, schedule='static'):
            _act_local_forward_channel(kind, x, res, out, pre, N, c, eps, _fat(w, c, 1.0),
                                       _fat(b, c, 0.0), slope, has_res, has_pre, stats)


cdef void _act_local_forward_any(
    int activation,             # IN  ACT_* code
    const floating[:, ::1] x,   # IN  (as in _act_local_forward_channels)
    const floating[:, ::1] res, # IN
    floating[:, ::1] out,       # OUT
    floating[:, ::1] pre,       # OUT
    Py_ssize_t N,               # IN
    double eps,                 # IN
    FVec w,                     # IN
    FVec b,                     # IN
    floating slope,             # IN
    bint has_res,               # IN
    bint has_pre,               # IN
    double* stats,              # OUT
    int nt,                     # IN
) noexcept nogil:
    """_act_local_forward_channels with the activation of a code."""
    if activation == _ACT_RELU:
        _act_local_forward_channels(_RELU, x, res, out, pre, N, eps, w, b, slope, has_res,
                                    has_pre, stats, nt)
    elif activation == _ACT_RELU6:
        _act_local_forward_channels(_RELU6, x, res, out, pre, N, eps, w, b, slope, has_res,
                                    has_pre, stats, nt)
    elif activation == _ACT_LEAKY_RELU:
        _act_local_forward_channels(_LEAKY_RELU, x, res, out, pre, N, eps, w, b, slope, has_res,
                                    has_pre, stats, nt)
    elif activation == _ACT_SILU:
        _act_local_forward_channels(_SILU, x, res, out, pre, N, eps, w, b, slope, has_res,
                                    has_pre, stats, nt)
    else:
        _act_local_forward_channels(_NO_ACTIVATION, x, res, out, pre, N, eps, w, b, slope,
                                    has_res, has_pre, stats, nt)


cdef void _local_backward_channels(
    const floating[:, ::1] dy,  # IN  runs (N * C, L)
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] out,       # OUT like dy, written when grad_input
    Py_ssize_t N,               # IN
    const double* mean,         # IN  (C,)
    const double* invstd,       # IN  (C,)
    FVec w,                     # IN  weight or None
    bint grad_input,            # IN
    double* sums,               # OUT (2C,)
    int nt,                     # IN  threads
) noexcept nogil:
    cdef Py_ssize_t C = dy.shape[0] // N, c
    if nt == 1:
        for c in range(C):
            _local_backward_channel(dy, x, out, N, c, mean[c], invstd[c], _fat(w, c, 1.0),
                                    grad_input, sums)
    else:
        for c in prange(C, num_threads=nt, schedule='static'):
            _local_backward_channel(dy, x, out, N, c, mean[c], invstd[c], _fat(w, c, 1.0),
                                    grad_input, sums)


cdef void _act_local_backward_channels(
    activation_kind kind,       # IN  the activation
    const floating[:, ::1] dy,  # IN  runs (N * C, L)
    const floating[:, ::1] s,   # IN  like dy
    const floating[:, ::1] x,   # IN  like dy
    floating[:, ::1] gz,        # OUT like dy
    floating[:, ::1] out,       # OUT like dy, written when grad_input
    Py_ssize_t N,               # IN
    const double* mean,         # IN  (C,)
    const double* invstd,       # IN  (C,)
    FVec w,                     # IN  weight or None
    floating slope,             # IN
    bint grad_input,            # IN
    double* sums,               # OUT (2C,)
    int nt,                     # IN  threads
) noexcept nogil:
    cdef Py_ssize_t C = dy.shape[0] // N, c
    if nt == 1:
        for c in range(C):
            _act_local_backward_channel(kind, dy, s, x, gz, out, N, c, mean[c], invstd[c],
                                        _fat(w, c, 1.0), slope, grad_input, sums)
    else:
        for c in prange(C, num_threads=nt, schedule='static'):
            _act_local_backward_channel(kind, dy, s, x, gz, out, N, c, mean[c], invstd[c],
                                        _fat(w, c, 1.0), slope, grad_input, sums)


cdef void _act_local_backward_any(
    int activation,             # IN  ACT_* code, not ACT_NONE
    const floating[:, ::1] dy,  # IN  (as in _act_local_backward_channels)
    const floating[:, ::1] s,   # IN
    const floating[:, ::1] x,   # IN
    floating[:, ::1] gz,        # OUT
    floating[:, ::1] out,       # OUT
    Py_ssize_t N,               # IN
    const double* mean,         # IN
    const double* invstd,       # IN
    FVec w,                     # IN
    floating slope,             # IN
    bint grad_input,            # IN
    double* sums,               # OUT
    int nt,                     # IN
) noexcept nogil:
    """_act_local_backward_channels with the activation of a code."""
    if activation == _ACT_RELU:
        _act_local_backward_channels(_RELU, dy, s, x, gz, out, N, mean, invstd, w, slope,
                                     grad_input, sums, nt)
    elif activation == _ACT_RELU6:
        _act_local_backward_channels(_RELU6, dy, s, x, gz, out, N, mean, invstd, w, slope,
                                     grad_input, sums, nt)
    elif activation == _ACT_LEAKY_RELU:
        _act_local_backward_channels(_LEAKY_RELU, dy, s, x, gz, out, N, mean, invstd, w, slope,
                                     grad_input, sums, nt)
    elif activation == _ACT_SILU:
        _act_local_backward_channels(_SILU, dy, s, x, gz, out, N, mean, invstd, w, slope,
                                     grad_input, sums, nt)
    else:
        _act_local_backward_channels(_NO_ACTIVATION, dy, s, x, gz, out, N, mean, invstd, w,
                                     slope, grad_input, sums, nt)


cdef object _zeros(Py_ssize_t n):
    """A zeroed float64 vector of n values."""
    cdef cnp.npy_intp dims[1]
    dims[0] = n
    return cnp.PyArray_ZEROS(1, dims, cnp.NPY_FLOAT64, 0)


# (IEEE float division as in finish_stats)
@cython.cdivision(True)
cdef int _rows_local_forward(cnp.ndarray a, object out, object residual, int activation,
                             double negative_slope, object preact, FVec w, FVec b, double eps,
                             double* st, int num_threads) except -1:
    """local_forward on rows (M, C): the sums of local_stats around a pivot in
    the data (each channel's first value), a second time around the mean for
    the channels whose pivot was far from it (as _channel_stats decides), the
    statistics in ``st`` (3, C), then the pass of normalize."""
    cdef Py_ssize_t C = cnp.PyArray_DIM(a, 1), c
    cdef double n = <double>cnp.PyArray_DIM(a, 0), d, v
    cdef Split sp = _split(a, num_threads, 1)
    cdef bint single = cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32
    cdef bint far
    cdef int attempt
    cdef double[:, :, ::1] acc
    cdef double[::1] piv, sums
    cdef const float[:, ::1] xf
    cdef const double[:, ::1] xd
    if single:
        xf = a
    else:
        xd = a
    for attempt in range(2):
        acc = _partials(&sp)
        piv = acc[sp.nt, SUM1, :C]     # the spare row of _partials
        sums = _zeros(2 * C)
        for c in range(C):
            if attempt == 0:
                v = <double>xf[0, c] if single else xd[0, c]
                piv[c] = v if isfinite(v) else 0.0
            else:
                piv[c] = st[c]         # the mean of the first attempt
        with nogil:
            if single:
                _sums(xf, xf, &sp, piv, False, acc, sums)
            else:
                _sums(xd, xd, &sp, piv, False, acc, sums)
        far = False
        for c in range(C):
            d = sums[c] / n            # mean - pivot
            v = sums[C + c] / n - d * d
            v = v if (v > 0.0 or v != v) else 0.0   # (NaN stays NaN)
            st[c] = piv[c] + d
            st[2 * C + c] = v
            if isfinite(d) and d * d > _REFINE * v:
                far = True
        if not far:
            break
    for c in range(C):
        st[C + c] = 1.0 / sqrt(st[2 * C + c] + eps)
    _normalize_pass(a, st, st + C, w, b, <cnp.ndarray>out, residual, activation, negative_slope,
                    preact, num_threads)
    return 0


cdef int _rows_local_backward(cnp.ndarray dy, cnp.ndarray x, object mean, const double* inv,
                              FVec w, object out, int activation, double negative_slope,
                              object saved, object grad_preact, double[::1] sums,
                              int num_threads) except -1:
    """local_backward on rows (M, C): the pass of backward_reduce into ``sums``
    (2C, zeroed: sum dz, sum dz * (x - mean)), then, with ``out``, the pass of
    backward_input over dz (dy, or grad_preact with an activation)."""
    cdef const double[::1] mu = mean
    _reduce_pass(dy, x, mu, activation, negative_slope, saved, grad_preact, sums, num_threads)
    if out is not None:
        _input_grad_pass(dy if activation == _ACT_NONE else <cnp.ndarray>grad_preact, x, &mu[0],
                         inv, w, &sums[0], &sums[mu.shape[0]], <double>cnp.PyArray_DIM(dy, 0),
                         <cnp.ndarray>out, num_threads)
    return 0


def local_forward(
    x,                      # IN  (N, C, L) or (M, C), float32/float64, C-contiguous
    weight,                 # IN  (C,) float32/float64 or None (= 1)
    bias,                   # IN  (C,) float32/float64 or None (= 0)
    double eps,             # IN
    out,                    # OUT like x (may be x or residual itself)
    stats,                  # OUT (3, C) float64: mean, invstd, biased variance
    next_shift=None,        # OUT (C,) float64 or None: the mean where finite
    running_mean=None,      # IN/OUT (C,) float32/float64 or None
    running_var=None,       # IN/OUT like running_mean (unbiased variance)
    factor=0.0,             # IN  weight of this batch; None: 1 / batches seen
    num_batches_tracked=None,  # IN/OUT int64 array of one element or None: += 1
    int num_threads=0,
    *,
    residual=None,          # IN  like x or None: added before the activation
    int activation=ACT_NONE,   # IN  ACT_*
    double negative_slope=0.01,  # IN  leaky_relu's
    preact=None,            # OUT like x or None (not out): z, the activation's input
):
    """The training forward of a group of one process, in one call: statistics
    (float64, around a pivot in the data as in local_stats), then
    ``out = (x - mean) * invstd * weight + bias`` (as in normalize), channel by
    channel (rows: each step over all channels); the statistics, the shift and
    the running statistics are written as finish_stats writes them. Every
    channel needs at least 2 values (ValueError otherwise, before anything is
    written).

    ``residual``, ``activation``, ``negative_slope`` and ``preact`` fuse the
    residual add and the activation into the normalization, as in normalize:
    ``out = activation(z)``, ``z = (x - mean) * invstd * weight + bias + residual``
    (the statistics are those of x alone).
    """
    cdef Py_ssize_t C = _check_data("x", x)
    _check_same("out", out, "x", <cnp.ndarray>x, True)
    _check_fused_forward(<cnp.ndarray>x, out, residual, activation, preact)
    cdef FVec w = _fvec("weight", weight, C)
    cdef FVec b = _fvec("bias", bias, C)
    if (not isinstance(stats, np.ndarray) or cnp.PyArray_NDIM(<cnp.ndarray>stats) != 2
            or cnp.PyArray_DIM(<cnp.ndarray>stats, 0) != 3
            or cnp.PyArray_DIM(<cnp.ndarray>stats, 1) != C
            or cnp.PyArray_TYPE(<cnp.ndarray>stats) != cnp.NPY_FLOAT64
            or cnp.PyArray_ISBYTESWAPPED(<cnp.ndarray>stats)):
        raise TypeError(f"stats: expected a (3, {C}) float64 numpy.ndarray (got {_describe(stats)})")
    _check_layout("stats", <cnp.ndarray>stats, True)
    cdef double* st = <double*>cnp.PyArray_DATA(<cnp.ndarray>stats)
    cdef double* nxt = _ptr(_vec("next_shift", next_shift, C, True, True))
    cdef FVec rm = _fvec("running_mean", running_mean, C, True)
    cdef FVec rv = _fvec("running_var", running_var, C, True)
    cdef int64_t* batches = _counter("num_batches_tracked", num_batches_tracked)
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef bint rows = cnp.PyArray_NDIM(a) == 2
    cdef Py_ssize_t N = cnp.PyArray_DIM(a, 0), L = 1 if rows else cnp.PyArray_DIM(a, 2), c
    cdef double count = <double>(N * L), f = 0.0 if factor is None else <double>factor
    cdef int nt
    cdef bint fused = residual is not None or activation != _ACT_NONE
    cdef bint has_res = residual is not None
    cdef bint has_pre = preact is not None
    cdef const float[:, ::1] xf, rf
    cdef float[:, ::1] of, pf
    cdef const double[:, ::1] xd, rd
    cdef double[:, ::1] od, pd
    if C == 0:
        return
    if count < 2.0:
        raise ValueError(f"x: expected at least 2 values per channel (got {count:g})")
    nt = _threads(num_threads, cnp.PyArray_SIZE(a) * 2, C)
    if rows:
        _rows_local_forward(a, out, residual, activation, negative_slope, preact, w, b, eps, st,
                            num_threads)
    elif cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        xf = _rows(a)
        of = _rows(<cnp.ndarray>out)
        if not fused:
            with nogil:
                _local_forward_channels(xf, of, N, eps, w, b, st, nt)
        else:
            rf = _rows(<cnp.ndarray>residual) if has_res else xf
            pf = _rows(<cnp.ndarray>preact) if has_pre else of
            with nogil:
                _act_local_forward_any(activation, xf, rf, of, pf, N, eps, w, b,
                                       <float>negative_slope, has_res, has_pre, st, nt)
    else:
        xd = _rows(a)
        od = _rows(<cnp.ndarray>out)
        if not fused:
            with nogil:
                _local_forward_channels(xd, od, N, eps, w, b, st, nt)
        else:
            rd = _rows(<cnp.ndarray>residual) if has_res else xd
            pd = _rows(<cnp.ndarray>preact) if has_pre else od
            with nogil:
                _act_local_forward_any(activation, xd, rd, od, pd, N, eps, w, b,
                                       negative_slope, has_res, has_pre, st, nt)
    _record_batch(st, st + 2 * C, count, C, nxt, rm, rv, batches, f, factor is None)


def local_backward(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float32/float64 or None (= 1)
    out=None,               # OUT like dy or None: gradient of the input (may be dy, x,
                            #     saved or grad_preact)
    grad_weight=None,       # OUT (C,) float32/float64 or None: sum(dz * (x - mean)) * invstd
    grad_bias=None,         # OUT (C,) float32/float64 or None: sum(dz)
    int num_threads=0,
    *,
    int activation=ACT_NONE,   # IN  ACT_*: the forward's activation
    double negative_slope=0.01,  # IN  leaky_relu's
    saved=None,             # IN  like dy, with an activation: its output y, or z
    grad_preact=None,       # OUT like dy, with an activation: dz (may be dy or saved, not x)
):
    """The backward of a group of one process, in one call: the reductions of
    backward_reduce, then (with ``out``) the input gradient of
    backward_input, channel by channel (rows: each step over all channels).

    With an ``activation``, as in backward_reduce: ``saved`` and
    ``grad_preact`` are required, and each channel's pass writes
    ``dz = dy * activation'(.)`` to ``grad_preact`` and sums over it; the
    input gradient is then computed from dz (as stored) and x, so ``out``
    may be ``grad_preact`` itself. With ACT_NONE both must be None (dz = dy).
    """
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", <cnp.ndarray>dy)
    cdef bint grad_input = out is not None
    if grad_input:
        _check_same("out", out, "dy", <cnp.ndarray>dy, True)
    _check_fused_backward(<cnp.ndarray>dy, x, activation, saved, grad_preact)
    cdef const double* mu = _ptr(_vec("mean", mean, C))
    cdef const double* inv = _ptr(_vec("invstd", invstd, C))
    cdef FVec w = _fvec("weight", weight, C)
    cdef FVec gw = _fvec("grad_weight", grad_weight, C, True)
    cdef FVec gb = _fvec("grad_bias", grad_bias, C, True)
    cdef cnp.ndarray a = <cnp.ndarray>dy
    cdef Py_ssize_t N = cnp.PyArray_DIM(a, 0), c
    cdef int nt
    cdef cnp.ndarray sums_array = _zeros(2 * C)  # [sum dz, sum dz * (x - mean)]
    cdef double* sums = <double*>cnp.PyArray_DATA(sums_array)
    cdef const float[:, ::1] gf, xf, sf
    cdef float[:, ::1] of, pf
    cdef const double[:, ::1] gd, xd, sd
    cdef double[:, ::1] od, pd
    if cnp.PyArray_SIZE(a) > 0 and cnp.PyArray_NDIM(a) == 2:
        _rows_local_backward(a, <cnp.ndarray>x, mean, inv, w, out, activation, negative_slope,
                             saved, grad_preact, sums_array, num_threads)
    elif cnp.PyArray_SIZE(a) > 0:
        nt = _threads(num_threads, cnp.PyArray_SIZE(a) * 2, C)
        if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
            gf = _rows(a)
            xf = _rows(<cnp.ndarray>x)
            if activation == _ACT_NONE:
                of = _rows(<cnp.ndarray>out) if grad_input else np.empty((0, 1), np.float32)
                with nogil:
                    _local_backward_channels(gf, xf, of, N, mu, inv, w, grad_input, sums, nt)
            else:
                sf = _rows(<cnp.ndarray>saved)
                pf = _rows(<cnp.ndarray>grad_preact)
                of = _rows(<cnp.ndarray>out) if grad_input else pf
                with nogil:
                    _act_local_backward_any(activation, gf, sf, xf, pf, of, N, mu, inv, w,
                                            <float>negative_slope, grad_input, sums, nt)
        else:
            gd = _rows(a)
            xd = _rows(<cnp.ndarray>x)
            if activation == _ACT_NONE:
                od = _rows(<cnp.ndarray>out) if grad_input else np.empty((0, 1), np.float64)
                with nogil:
                    _local_backward_channels(gd, xd, od, N, mu, inv, w, grad_input, sums, nt)
            else:
                sd = _rows(<cnp.ndarray>saved)
                pd = _rows(<cnp.ndarray>grad_preact)
                od = _rows(<cnp.ndarray>out) if grad_input else pd
                with nogil:
                    _act_local_backward_any(activation, gd, sd, xd, pd, od, N, mu, inv, w,
                                            negative_slope, grad_input, sums, nt)
    for c in range(C):
        if gw.data != NULL:
            _fput(gw, c, sums[C + c] * inv[c])
        if gb.data != NULL:
            _fput(gb, c, sums[c])


# build description (read by syncbn.build_info)
# ---------------------------------------------------------------------------

cdef extern from *:
    """
    #ifndef SYNCBN_BUILD_CFLAGS
    #define SYNCBN_BUILD_CFLAGS "unknown (built without setup.py)"
    #endif
    #ifndef SYNCBN_KERNEL_VARIANT
    #define SYNCBN_KERNEL_VARIANT "unknown (built without setup.py)"
    #endif
    #if defined(__clang__)
    #define SYNCBN_BUILD_COMPILER "clang " __clang_version__
    #elif defined(__GNUC__)
    #define SYNCBN_BUILD_COMPILER "gcc " __VERSION__
    #elif defined(__VERSION__)
    #define SYNCBN_BUILD_COMPILER __VERSION__
    #else
    #define SYNCBN_BUILD_COMPILER "unknown"
    #endif
    """
    const char* SYNCBN_BUILD_CFLAGS
    const char* SYNCBN_BUILD_COMPILER
    const char* SYNCBN_KERNEL_VARIANT


def build_flags() -> str:
    """The compiler flags setup.py passed for this extension (compiled into it)."""
    return SYNCBN_BUILD_CFLAGS.decode("utf-8")


def build_compiler() -> str:
    """The compiler that built this extension, as its own macros name it."""
    return SYNCBN_BUILD_COMPILER.decode("utf-8")


def build_variant() -> str:
    """The variant of the kernels this extension is (setup.py's name for its -march)."""
    return SYNCBN_KERNEL_VARIANT.decode("utf-8")
