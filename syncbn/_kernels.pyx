# cython: language_level=3
"""Per-channel kernels of synchronized batch normalization.

Two memory layouts, so that no input ever needs a transposed copy:

* channels-first ``(N, C, L)``: NCHW / NCDHW / (N, C, L) tensors, L = product
  of the spatial dimensions (L may be 1);
* rows ``(M, C)``: 2-D input and channels-last tensors, M = N * spatial.

Both must be C-contiguous, float32 or float64. Per-channel vectors (shift,
mean, invstd, weight, bias, ...) are float64 of length C, and every reduction
accumulates in float64 whatever the input dtype.

Each public ``def`` validates and raises errors saying "expected X (got Y)";
the arithmetic lives in ``cdef ... noexcept nogil`` helpers. ``num_threads=0``
means "as many as OpenMP allows"; the count is further capped by the amount of
work, so small tensors never pay for a thread team.
"""

cimport cython
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport sqrt
from libc.stdlib cimport calloc, free
from libc.string cimport memset

import numpy as np

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

cdef enum:
    # Elements per thread below which another thread costs more than it saves.
    GRAIN = 32768
    # Independent accumulators per reduction: lets gcc vectorize a float64 sum
    # (4 lanes x 2 registers with AVX2) without -ffast-math.
    LANES = 8


def openmp_enabled() -> bool:
    """Whether the extension was compiled with OpenMP."""
    return SYNCBN_OPENMP == 1


def max_threads() -> int:
    """OpenMP's default thread count (1 without OpenMP)."""
    return syncbn_max_threads()


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------

cdef str _describe(object a):
    if not isinstance(a, np.ndarray):
        return type(a).__name__
    flags = "C-contiguous" if a.flags.c_contiguous else "non-contiguous"
    return f"{a.dtype} array of shape {a.shape}, {flags}"


cdef Py_ssize_t _check_data(str name, object x) except -1:
    """Check a data array; return its channel count."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray (got {type(x).__name__})")
    if x.ndim not in (2, 3):
        raise ValueError(
            f"{name}: expected shape (N, C, L) channels-first or (M, C) rows "
            f"(got {x.ndim} dimensions, shape {x.shape})")
    if x.dtype != np.float32 and x.dtype != np.float64:
        raise TypeError(f"{name}: expected dtype float32 or float64 (got {x.dtype})")
    if not x.flags.c_contiguous:
        raise ValueError(
            f"{name}: expected a C-contiguous array (got strides {x.strides} "
            f"for shape {x.shape}); pass np.ascontiguousarray(...)")
    return x.shape[1]


cdef _check_same(str name, object a, str ref_name, object ref):
    _check_data(name, a)
    if a.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} like {ref_name} (got {a.dtype})")
    if a.shape != ref.shape:
        raise ValueError(f"{name}: expected shape {ref.shape} like {ref_name} (got {a.shape})")


cdef _check_vec(str name, object v, Py_ssize_t n, bint allow_none=False):
    if v is None and allow_none:
        return
    if not isinstance(v, np.ndarray) or v.dtype != np.float64 or v.ndim != 1:
        raise TypeError(
            f"{name}: expected a 1-D float64 numpy.ndarray of length {n} (got {_describe(v)})")
    if v.shape[0] != n:
        raise ValueError(f"{name}: expected length {n} (got {v.shape[0]})")
    if not v.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous array (got strides {v.strides})")


cdef int _threads(int requested, Py_ssize_t work, Py_ssize_t parts) noexcept:
    """Thread count: requested (0 = OpenMP default), capped by work and parts."""
    cdef int t = requested if requested > 0 else syncbn_max_threads()
    cdef Py_ssize_t by_work = work // GRAIN
    if by_work < t:
        t = <int>by_work
    if parts < t:
        t = <int>parts
    return t if t > 0 else 1


# ---------------------------------------------------------------------------
# 1. local statistics: count, sum(x - shift), sum((x - shift)^2)
# ---------------------------------------------------------------------------

@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _run_moments(
    const floating* x,      # IN  L contiguous values
    Py_ssize_t L,           # IN
    double p,               # IN  pivot
    double* s1,             # OUT += sum(x - p)
    double* s2,             # OUT += sum((x - p)^2)
) noexcept nogil:
    cdef double a[LANES]
    cdef double b[LANES]
    cdef double v
    cdef Py_ssize_t i, i8, j, L8 = L - L % LANES
    for j in range(LANES):
        a[j] = 0.0
        b[j] = 0.0
    for i8 in range(L // LANES):
        i = i8 * LANES
        for j in range(LANES):
            v = <double>x[i + j] - p
            a[j] += v
            b[j] += v * v
    for i in range(L8, L):
        v = <double>x[i] - p
        a[0] += v
        b[0] += v * v
    for j in range(LANES):
        s1[0] += a[j]
        s2[0] += b[j]


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void _stats_cf(
    const floating[:, :, ::1] x,    # IN  (N, C, L)
    double* pivot,                  # IN  (C,)
    double* s1,                     # OUT (C,)
    double* s2,                     # OUT (C,)
    int num_threads,                # IN
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t n, c
    cdef double a, b
    for c in prange(C, num_threads=num_threads, schedule='static'):
        a = 0.0
        b = 0.0
        for n in range(N):
            _run_moments(&x[n, c, 0], L, pivot[c], &a, &b)
        s1[c] = a
        s2[c] = b


@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void _stats_rows(
    const floating[:, ::1] x,       # IN  (M, C)
    double* pivot,                  # IN  (C,)
    double* s1,                     # OUT (C,)
    double* s2,                     # OUT (C,)
    double* scratch,                # TMP (num_threads, 2C), zeroed
    int num_threads,                # IN
) noexcept nogil:
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t m, c, t
    cdef const floating* row
    cdef double* a
    cdef double* b
    cdef double v
    a = b = NULL  # assigned per thread below; set here for the compiler
    with parallel(num_threads=num_threads):
        # thread-local accumulators: one row of the scratch per thread
        a = scratch + 2 * C * threadid()
        b = a + C
        for m in prange(M, schedule='static'):
            row = &x[m, 0]
            for c in range(C):
                v = <double>row[c] - pivot[c]
                a[c] += v
                b[c] += v * v
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    for t in range(num_threads):
        for c in range(C):
            s1[c] += scratch[2 * C * t + c]
            s2[c] += scratch[2 * C * t + C + c]


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

    Each channel is first accumulated around a local pivot (its first value
    here), so the float64 sums never cancel catastrophically however large
    ``|mean| / std`` is; they are then moved to ``shift`` in float64. The
    result stays accurate as long as ``|mean - shift| / std`` is well below
    1e8, and is exact in the count. Empty input gives zeros.
    """
    cdef Py_ssize_t C = _check_data("x", x)
    _check_vec("shift", shift, C)
    _check_vec("out", out, 2 * C + 1)
    cdef Py_ssize_t count = x.size // C if C > 0 else 0
    cdef double[::1] sh = shift
    cdef double[::1] o = out
    cdef double[::1] piv
    cdef Py_ssize_t c
    cdef double d, n = <double>count
    cdef int nt
    cdef double* scratch
    o[:] = 0.0
    o[2 * C] = n
    if count == 0:
        return
    piv = np.array(x[0] if x.ndim == 2 else x[0, :, 0], dtype=np.float64)
    if x.ndim == 3:
        nt = _threads(num_threads, x.size, C)
        if x.dtype == np.float32:
            _stats_cf[float](x, &piv[0], &o[0], &o[C], nt)
        else:
            _stats_cf[double](x, &piv[0], &o[0], &o[C], nt)
    else:
        nt = _threads(num_threads, x.size, x.shape[0])
        scratch = <double*>calloc(2 * C * nt, sizeof(double))
        if scratch == NULL:
            raise MemoryError()
        try:
            if x.dtype == np.float32:
                _stats_rows[float](x, &piv[0], &o[0], &o[C], scratch, nt)
            else:
                _stats_rows[double](x, &piv[0], &o[0], &o[C], scratch, nt)
        finally:
            free(scratch)
    # move from the pivot p to the common shift s: with d = p - s,
    # sum(x - s) = S1 + n d,  sum((x - s)^2) = S2 + 2 d S1 + n d^2
    for c in range(C):
        d = piv[c] - sh[c]
        o[C + c] = o[C + c] + d * (2.0 * o[c] + n * d)
        o[c] = o[c] + n * d


# ---------------------------------------------------------------------------
# 2 and 4. per-channel affine passes
#    forward:  y  = x * a + b
#    backward: dx = dy * a + x * b + k
# ---------------------------------------------------------------------------

@cython.boundscheck(False)
@cython.wraparound(False)
@cython.cdivision(True)
cdef void _affine_cf(
    const floating[:, :, ::1] x,    # IN  (N, C, L)
    const floating[:, :, ::1] z,    # IN  (N, C, L) second input, may be x when zc is 0
    floating[:, :, ::1] out,        # OUT (N, C, L)
    const double* xa,               # IN  (C,) coefficient of x
    const double* zc,               # IN  (C,) coefficient of z
    const double* k,                # IN  (C,) constant
    int num_threads,                # IN
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t r, n, c, i
    cdef const floating* xp
    cdef const floating* zp
    cdef floating* op
    cdef double ca, cz, ck
    for r in prange(N * C, num_threads=num_threads, schedule='static'):
        n = r // C
        c = r % C
        xp = &x[n, c, 0]
        zp = &z[n, c, 0]
        op = &out[n, c, 0]
        ca = xa[c]
        cz = zc[c]
        ck = k[c]
        if cz == 0.0:
            for i in range(L):
                op[i] = <floating>(<double>xp[i] * ca + ck)
        else:
            for i in range(L):
                op[i] = <floating>(<double>xp[i] * ca + <double>zp[i] * cz + ck)


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _affine_rows(
    const floating[:, ::1] x,       # IN  (M, C)
    const floating[:, ::1] z,       # IN  (M, C)
    floating[:, ::1] out,           # OUT (M, C)
    const double* xa,               # IN  (C,)
    const double* zc,               # IN  (C,)
    const double* k,                # IN  (C,)
    bint use_z,                     # IN
    int num_threads,                # IN
) noexcept nogil:
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t m, c
    cdef const floating* xp
    cdef const floating* zp
    cdef floating* op
    for m in prange(M, num_threads=num_threads, schedule='static'):
        xp = &x[m, 0]
        zp = &z[m, 0]
        op = &out[m, 0]
        if use_z:
            for c in range(C):
                op[c] = <floating>(<double>xp[c] * xa[c] + <double>zp[c] * zc[c] + k[c])
        else:
            for c in range(C):
                op[c] = <floating>(<double>xp[c] * xa[c] + k[c])


cdef _affine(x, z, out, double[::1] xa, double[::1] zc, double[::1] k, bint use_z,
             int num_threads):
    cdef Py_ssize_t C = x.shape[1]
    if x.size == 0:
        return
    cdef int nt
    if x.ndim == 3:
        nt = _threads(num_threads, x.size, x.shape[0] * C)
        if not use_z:
            zc = np.zeros(C, dtype=np.float64)
        if x.dtype == np.float32:
            _affine_cf[float](x, z, out, &xa[0], &zc[0], &k[0], nt)
        else:
            _affine_cf[double](x, z, out, &xa[0], &zc[0], &k[0], nt)
    else:
        nt = _threads(num_threads, x.size, x.shape[0])
        if x.dtype == np.float32:
            _affine_rows[float](x, z, out, &xa[0], &zc[0], &k[0], use_z, nt)
        else:
            _affine_rows[double](x, z, out, &xa[0], &zc[0], &k[0], use_z, nt)


def normalize(
    x,                      # IN  (N, C, L) or (M, C), float32/float64, C-contiguous
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float64 or None (= 1)
    bias,                   # IN  (C,) float64 or None (= 0)
    out,                    # OUT like x
    int num_threads=0,
):
    """``out = (x - mean) * invstd * weight + bias``, one pass.

    Weight, bias, mean and invstd are folded into one float64 scale and
    offset per channel; the arithmetic is float64, so a large ``|mean|``
    costs no accuracy, and the result is rounded once to the dtype of x.
    """
    cdef Py_ssize_t C = _check_data("x", x)
    _check_same("out", out, "x", x)
    _check_vec("mean", mean, C)
    _check_vec("invstd", invstd, C)
    _check_vec("weight", weight, C, allow_none=True)
    _check_vec("bias", bias, C, allow_none=True)
    scale = invstd * weight if weight is not None else invstd.copy()
    offset = -mean * scale
    if bias is not None:
        offset += bias
    _affine(x, x, out, scale, scale, offset, False, num_threads)


def backward_input(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float64 or None (= 1)
    mean_dy,                # IN  (C,) float64: global sum(dy) / count
    mean_dy_xmu,            # IN  (C,) float64: global sum(dy * (x - mean)) / count
    out,                    # OUT like x: gradient of the input
    int num_threads=0,
):
    """``out = (dy - mean_dy - (x - mean) * invstd**2 * mean_dy_xmu) * invstd * weight``.

    Folded into ``dy * a + x * b + k`` per channel, float64 arithmetic, one pass.
    """
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", dy)
    _check_same("out", out, "dy", dy)
    for name, v in (("mean", mean), ("invstd", invstd), ("mean_dy", mean_dy),
                    ("mean_dy_xmu", mean_dy_xmu)):
        _check_vec(name, v, C)
    _check_vec("weight", weight, C, allow_none=True)
    a = invstd * weight if weight is not None else invstd.copy()
    b = -a * invstd * invstd * mean_dy_xmu
    k = -a * mean_dy - b * mean
    _affine(dy, x, out, a, b, k, True, num_threads)


# ---------------------------------------------------------------------------
# 3. backward reductions: sum(dy), sum(dy * (x - mean))
# ---------------------------------------------------------------------------

@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline void _run_dot(
    const floating* dy,     # IN  L values
    const floating* x,      # IN  L values
    Py_ssize_t L,           # IN
    double mu,              # IN
    double* s1,             # OUT += sum(dy)
    double* s2,             # OUT += sum(dy * (x - mu))
) noexcept nogil:
    cdef double a[LANES]
    cdef double b[LANES]
    cdef double g
    cdef Py_ssize_t i, i8, j, L8 = L - L % LANES
    for j in range(LANES):
        a[j] = 0.0
        b[j] = 0.0
    for i8 in range(L // LANES):
        i = i8 * LANES
        for j in range(LANES):
            g = <double>dy[i + j]
            a[j] += g
            b[j] += g * (<double>x[i + j] - mu)
    for i in range(L8, L):
        g = <double>dy[i]
        a[0] += g
        b[0] += g * (<double>x[i] - mu)
    for j in range(LANES):
        s1[0] += a[j]
        s2[0] += b[j]


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _dot_cf(
    const floating[:, :, ::1] dy,   # IN  (N, C, L)
    const floating[:, :, ::1] x,    # IN  (N, C, L)
    const double* mean,             # IN  (C,)
    double* s1,                     # OUT (C,)
    double* s2,                     # OUT (C,)
    int num_threads,                # IN
) noexcept nogil:
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], L = x.shape[2]
    cdef Py_ssize_t n, c
    cdef double a, b
    for c in prange(C, num_threads=num_threads, schedule='static'):
        a = 0.0
        b = 0.0
        for n in range(N):
            _run_dot(&dy[n, c, 0], &x[n, c, 0], L, mean[c], &a, &b)
        s1[c] = a
        s2[c] = b


@cython.boundscheck(False)
@cython.wraparound(False)
cdef void _dot_rows(
    const floating[:, ::1] dy,      # IN  (M, C)
    const floating[:, ::1] x,       # IN  (M, C)
    const double* mean,             # IN  (C,)
    double* s1,                     # OUT (C,)
    double* s2,                     # OUT (C,)
    double* scratch,                # TMP (num_threads, 2C), zeroed
    int num_threads,                # IN
) noexcept nogil:
    cdef Py_ssize_t M = x.shape[0], C = x.shape[1]
    cdef Py_ssize_t m, c, t
    cdef const floating* gp
    cdef const floating* xp
    cdef double* a
    cdef double* b
    cdef double g
    a = b = NULL  # assigned per thread below; set here for the compiler
    with parallel(num_threads=num_threads):
        a = scratch + 2 * C * threadid()
        b = a + C
        for m in prange(M, schedule='static'):
            gp = &dy[m, 0]
            xp = &x[m, 0]
            for c in range(C):
                g = <double>gp[c]
                a[c] += g
                b[c] += g * (<double>xp[c] - mean[c])
    for c in range(C):
        s1[c] = 0.0
        s2[c] = 0.0
    for t in range(num_threads):
        for c in range(C):
            s1[c] += scratch[2 * C * t + c]
            s2[c] += scratch[2 * C * t + C + c]


def backward_reduce(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    out,                    # OUT (2C,) float64: [sum(dy), sum(dy * (x - mean))]
    int num_threads=0,
):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass, float64."""
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", dy)
    _check_vec("mean", mean, C)
    _check_vec("out", out, 2 * C)
    cdef double[::1] mu = mean
    cdef double[::1] o = out
    cdef int nt
    cdef double* scratch
    o[:] = 0.0
    if x.size == 0:
        return
    if x.ndim == 3:
        nt = _threads(num_threads, 2 * x.size, C)
        if x.dtype == np.float32:
            _dot_cf[float](dy, x, &mu[0], &o[0], &o[C], nt)
        else:
            _dot_cf[double](dy, x, &mu[0], &o[0], &o[C], nt)
    else:
        nt = _threads(num_threads, 2 * x.size, x.shape[0])
        scratch = <double*>calloc(2 * C * nt, sizeof(double))
        if scratch == NULL:
            raise MemoryError()
        try:
            if x.dtype == np.float32:
                _dot_rows[float](dy, x, &mu[0], &o[0], &o[C], scratch, nt)
            else:
                _dot_rows[double](dy, x, &mu[0], &o[0], &o[C], scratch, nt)
        finally:
            free(scratch)
