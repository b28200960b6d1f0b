# cython: language_level=3
"""Per-channel kernels of synchronized batch normalization.

Two memory layouts, so that no input ever needs a transposed copy:

* channels-first ``(N, C, L)``: NCHW / NCDHW / (N, C, L) tensors, L = product
  of the spatial dimensions (L may be 1);
* rows ``(M, C)``: 2-D input and channels-last tensors, M = N * spatial.

Both must be C-contiguous, float32 or float64. Per-channel vectors (shift,
mean, invstd, weight, bias, ...) are float64 of length C, and every reduction
accumulates in float64 whatever the input dtype.

Each public ``def`` validates (with the numpy C API: well under a microsecond)
and raises errors saying "expected X (got Y)"; the arithmetic lives in
``noexcept nogil`` helpers. ``num_threads=0`` means "as many as OpenMP
allows"; the count is further capped by the amount of work, so small tensors
never pay for a thread team, and one thread runs without a parallel region.

How the work is split. A channels-first tensor is N * C *runs* of L
contiguous values; when there are fewer runs than the threads need (C small,
N * L large) each run is cut into S *pieces*. Pieces (or rows, for the rows
layout) are dealt out in one contiguous *share* per thread, each share with
its own partial sums, merged at the end, so the result does not depend on how
many threads OpenMP actually starts. The reductions go through short runs
(L < STREAM_MIN_L) channel by channel, all the runs of a channel in one call
and one horizontal sum, and through long runs in memory order; rows 16
columns at a time, the partial sums in registers. The element-wise passes go
in memory order.

Vectorization. The inner loops are small C primitives (the second extern
block) written with GCC/Clang vector extensions. gcc 12 auto-vectorizes a
float -> float64 lane reduction only in some inlining contexts (it lost it,
4x slower, after an unrelated change to the loops around it), and the code
it generates for the float32 <-> float64 conversions of the element-wise
passes runs at 2/3 of the speed of the hand-written form (a vextractf128 or
vinsertf128 around every conversion). scripts/bench_kernels.py measures them.
"""

cimport cython
cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport isfinite
from libc.stdlib cimport calloc, free, malloc

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
    /* syncbn primitives, T = float (suffix f) or double (suffix d).
     *
     * Reductions over channels-first runs: `runs` runs of n contiguous values,
     * `stride` elements apart, all of one channel.
     *   moments:      *s1 += sum(x - p),  *s2 += sum((x - p)^2)
     *   dot:          *s1 += sum(dy),     *s2 += sum(dy * (x - mu))
     * Reductions over rows: a (rows, C) block, per column c.
     *   cols_moments: s1[c] += sum(x - p[c]),  s2[c] += sum((x - p[c])^2)
     *   cols_dot:     s1[c] += sum(dy),        s2[c] += sum(dy * (x - mu[c]))
     * Element-wise passes, float64 arithmetic, rounded once to T.
     *   affine:       out = x * a + k                (one run, scalar a, k)
     *   affine2:      out = x * a + (z * b + k)
     *   rows_affine:  the same over a (rows, C) block, per-column a[c], k[c]
     *   rows_affine2
     *
     * The runs reductions keep 16 independent float64 partial sums per total
     * (four vectors of 4 doubles: enough to hide the latency of the adds and
     * FMAs without reassociating anything), fold them into a second level every
     * SYNCBN_BLOCK values and add that up pairwise at the end; the rows
     * reductions keep a column's partial sum in a lane of a register and add it
     * to memory every SYNCBN_ROWS rows. So no float64 sum runs sequentially over
     * more than a few hundred terms.
     *
     * Written with GCC/Clang vector extensions: AVX2 with -march=native, pairs of
     * SSE2 operations on a baseline x86-64, NEON on arm64. Other compilers, or
     * -DSYNCBN_PLAIN_C (SYNCBN_PLAIN_C=1 python setup.py ...), get the same
     * arithmetic in plain C (SYNCBN_VECTOR_EXT 0).
     */
    #define SYNCBN_LANES 16
    #define SYNCBN_BLOCK 4096
    #define SYNCBN_ROWS 256

    #if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 5)) && !defined(SYNCBN_PLAIN_C)
    #define SYNCBN_VECTOR_EXT 1
    typedef double syncbn_v4d __attribute__((vector_size(32)));
    static const syncbn_v4d syncbn_zero = {0.0, 0.0, 0.0, 0.0};
    /* the element-wise forms compile to one vcvtps2pd / vcvtpd2ps / vmovupd */
    #define SYNCBN_LOAD4(p) \\
        ((syncbn_v4d){(double)(p)[0], (double)(p)[1], (double)(p)[2], (double)(p)[3]})
    #define SYNCBN_STORE4(p, v, T) \\
        ((p)[0] = (T)(v)[0], (p)[1] = (T)(v)[1], (p)[2] = (T)(v)[2], (p)[3] = (T)(v)[3])
    #define SYNCBN_ADD4(p, v) \\
        ((p)[0] += (v)[0], (p)[1] += (v)[1], (p)[2] += (v)[2], (p)[3] += (v)[3])
    static inline double syncbn_hsum4(syncbn_v4d v) { return (v[0] + v[1]) + (v[2] + v[3]); }
    /* the 16 lanes into the second level, V and W */
    #define SYNCBN_FLUSH()                                                          \\
        (V += (v0 + v1) + (v2 + v3), W += (w0 + w1) + (w2 + w3),                    \\
         v0 = v1 = v2 = v3 = w0 = w1 = w2 = w3 = syncbn_zero)

    /* SYNCBN_SUB(x, P) is x - P. With FMA it is computed as x * 1 - P, which
     * rounds identically (x * 1 is exact) but runs on the FMA pipes instead of the
     * add pipes, which the conversions and the sums already fill: on Zen 3 this
     * takes local_stats from 8 to 11 values/ns. The 1 is read from a volatile so
     * that the compiler cannot fold the multiplication away. */
    #ifdef __FMA__
    static volatile double syncbn_one = 1.0;
    #define SYNCBN_ONE_DECL \\
        const double one_ = syncbn_one; const syncbn_v4d ONE = {one_, one_, one_, one_}
    #define SYNCBN_SUB(x, P) ((x) * ONE - (P))
    #else
    #define SYNCBN_ONE_DECL const int no_fma_ = 0; (void)no_fma_
    #define SYNCBN_SUB(x, P) ((x) - (P))
    #endif

    #define SYNCBN_DEFINE(S, T)                                                             \\
    static void syncbn_moments_##S(const T* x, Py_ssize_t runs, Py_ssize_t stride,          \\
                                   Py_ssize_t n, double p, double* s1, double* s2) {        \\
        const syncbn_v4d P = {p, p, p, p};                                                  \\
        const Py_ssize_t n16 = n - n % 16;                                                  \\
        syncbn_v4d d, V = syncbn_zero, W = V, v0 = V, v1 = V, v2 = V, v3 = V,               \\
                   w0 = V, w1 = V, w2 = V, w3 = V;                                          \\
        double u, tv = 0.0, tw = 0.0;                                                       \\
        Py_ssize_t r, i, e, fill = 0;                                                       \\
        SYNCBN_ONE_DECL;                                                                    \\
        for (r = 0; r < runs; r++, x += stride) {                                           \\
            for (i = 0; i < n16; i = e) {                                                   \\
                e = n16 - i < SYNCBN_BLOCK - fill ? n16 : i + SYNCBN_BLOCK - fill;          \\
                fill += e - i;                                                              \\
                for (; i < e; i += 16) {                                                    \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(x + i), P);      v0 += d; w0 += d * d;      \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(x + i + 4), P);  v1 += d; w1 += d * d;      \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(x + i + 8), P);  v2 += d; w2 += d * d;      \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(x + i + 12), P); v3 += d; w3 += d * d;      \\
                }                                                                           \\
                if (fill == SYNCBN_BLOCK) {                                                 \\
                    SYNCBN_FLUSH();                                                         \\
                    fill = 0;                                                               \\
                }                                                                           \\
            }                                                                               \\
            for (; i + 4 <= n; i += 4) {                                                    \\
                d = SYNCBN_SUB(SYNCBN_LOAD4(x + i), P);          V += d;  W += d * d;       \\
            }                                                                               \\
            for (; i < n; i++) {                                                            \\
                u = (double)x[i] - p;                            tv += u; tw += u * u;      \\
            }                                                                               \\
        }                                                                                   \\
        SYNCBN_FLUSH();                                                                     \\
        *s1 += syncbn_hsum4(V) + tv;                                                        \\
        *s2 += syncbn_hsum4(W) + tw;                                                        \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_dot_##S(const T* dy, const T* x, Py_ssize_t runs,                    \\
                               Py_ssize_t stride, Py_ssize_t n, double mu,                  \\
                               double* s1, double* s2) {                                    \\
        const syncbn_v4d M = {mu, mu, mu, mu};                                              \\
        const Py_ssize_t n16 = n - n % 16;                                                  \\
        syncbn_v4d g, V = syncbn_zero, W = V, v0 = V, v1 = V, v2 = V, v3 = V,               \\
                   w0 = V, w1 = V, w2 = V, w3 = V;                                          \\
        double h, tv = 0.0, tw = 0.0;                                                       \\
        Py_ssize_t r, i, e, fill = 0;                                                       \\
        SYNCBN_ONE_DECL;                                                                    \\
        for (r = 0; r < runs; r++, dy += stride, x += stride) {                             \\
            for (i = 0; i < n16; i = e) {                                                   \\
                e = n16 - i < SYNCBN_BLOCK - fill ? n16 : i + SYNCBN_BLOCK - fill;          \\
                fill += e - i;                                                              \\
                for (; i < e; i += 16) {                                                    \\
                    g = SYNCBN_LOAD4(dy + i);      v0 += g;                                 \\
                    w0 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + i), M);                           \\
                    g = SYNCBN_LOAD4(dy + i + 4);  v1 += g;                                 \\
                    w1 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + i + 4), M);                       \\
                    g = SYNCBN_LOAD4(dy + i + 8);  v2 += g;                                 \\
                    w2 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + i + 8), M);                       \\
                    g = SYNCBN_LOAD4(dy + i + 12); v3 += g;                                 \\
                    w3 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + i + 12), M);                      \\
                }                                                                           \\
                if (fill == SYNCBN_BLOCK) {                                                 \\
                    SYNCBN_FLUSH();                                                         \\
                    fill = 0;                                                               \\
                }                                                                           \\
            }                                                                               \\
            for (; i + 4 <= n; i += 4) {                                                    \\
                g = SYNCBN_LOAD4(dy + i);          V += g;                                  \\
                W += g * SYNCBN_SUB(SYNCBN_LOAD4(x + i), M);                                \\
            }                                                                               \\
            for (; i < n; i++) {                                                            \\
                h = (double)dy[i];                 tv += h;                                 \\
                tw += h * ((double)x[i] - mu);                                              \\
            }                                                                               \\
        }                                                                                   \\
        SYNCBN_FLUSH();                                                                     \\
        *s1 += syncbn_hsum4(V) + tv;                                                        \\
        *s2 += syncbn_hsum4(W) + tw;                                                        \\
    }                                                                                       \\
                                                                                            \\
    /* rows: 16 columns at a time, each column's partial sums in its own lane,              \\
       added to s1, s2 every SYNCBN_ROWS rows */                                            \\
    static void syncbn_cols_moments_##S(const T* x, Py_ssize_t rows, Py_ssize_t C,          \\
                                        const double* p, double* s1, double* s2) {          \\
        syncbn_v4d d, P0, P1, P2, P3, v0, v1, v2, v3, w0, w1, w2, w3;                       \\
        const T* r;                                                                         \\
        Py_ssize_t m0, m1, m, c;                                                            \\
        double u, a0, a1, b0, b1;                                                           \\
        SYNCBN_ONE_DECL;                                                                    \\
        for (m0 = 0; m0 < rows; m0 = m1) {                                                  \\
            m1 = rows - m0 < SYNCBN_ROWS ? rows : m0 + SYNCBN_ROWS;                         \\
            for (c = 0; c + 16 <= C; c += 16) {                                             \\
                P0 = SYNCBN_LOAD4(p + c);     P1 = SYNCBN_LOAD4(p + c + 4);                 \\
                P2 = SYNCBN_LOAD4(p + c + 8); P3 = SYNCBN_LOAD4(p + c + 12);                \\
                v0 = v1 = v2 = v3 = w0 = w1 = w2 = w3 = syncbn_zero;                        \\
                for (m = m0, r = x + m0 * C + c; m < m1; m++, r += C) {                     \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r), P0);      v0 += d; w0 += d * d;         \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r + 4), P1);  v1 += d; w1 += d * d;         \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r + 8), P2);  v2 += d; w2 += d * d;         \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r + 12), P3); v3 += d; w3 += d * d;         \\
                }                                                                           \\
                SYNCBN_ADD4(s1 + c, v0);      SYNCBN_ADD4(s2 + c, w0);                      \\
                SYNCBN_ADD4(s1 + c + 4, v1);  SYNCBN_ADD4(s2 + c + 4, w1);                  \\
                SYNCBN_ADD4(s1 + c + 8, v2);  SYNCBN_ADD4(s2 + c + 8, w2);                  \\
                SYNCBN_ADD4(s1 + c + 12, v3); SYNCBN_ADD4(s2 + c + 12, w3);                 \\
            }                                                                               \\
            for (; c + 4 <= C; c += 4) {                                                    \\
                P0 = SYNCBN_LOAD4(p + c);                                                   \\
                v0 = v1 = w0 = w1 = syncbn_zero;                                            \\
                for (m = m0, r = x + m0 * C + c; m + 2 <= m1; m += 2, r += 2 * C) {         \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r), P0);      v0 += d; w0 += d * d;         \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r + C), P0);  v1 += d; w1 += d * d;         \\
                }                                                                           \\
                if (m < m1) {                                                               \\
                    d = SYNCBN_SUB(SYNCBN_LOAD4(r), P0);      v0 += d; w0 += d * d;         \\
                }                                                                           \\
                v0 += v1;                                                                   \\
                w0 += w1;                                                                   \\
                SYNCBN_ADD4(s1 + c, v0);      SYNCBN_ADD4(s2 + c, w0);                      \\
            }                                                                               \\
            for (; c < C; c++) {                                                            \\
                a0 = a1 = b0 = b1 = 0.0;                                                    \\
                for (m = m0, r = x + m0 * C + c; m + 2 <= m1; m += 2, r += 2 * C) {         \\
                    u = (double)r[0] - p[c];                  a0 += u; b0 += u * u;         \\
                    u = (double)r[C] - p[c];                  a1 += u; b1 += u * u;         \\
                }                                                                           \\
                if (m < m1) {                                                               \\
                    u = (double)r[0] - p[c];                  a0 += u; b0 += u * u;         \\
                }                                                                           \\
                s1[c] += a0 + a1;                                                           \\
                s2[c] += b0 + b1;                                                           \\
            }                                                                               \\
        }                                                                                   \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_cols_dot_##S(const T* dy, const T* x, Py_ssize_t rows,               \\
                                    Py_ssize_t C, const double* mu, double* s1,             \\
                                    double* s2) {                                           \\
        syncbn_v4d g, M0, M1, M2, M3, v0, v1, v2, v3, w0, w1, w2, w3;                       \\
        Py_ssize_t m0, m1, m, c, o;                                                         \\
        double h, a0, a1, b0, b1;                                                           \\
        SYNCBN_ONE_DECL;                                                                    \\
        for (m0 = 0; m0 < rows; m0 = m1) {                                                  \\
            m1 = rows - m0 < SYNCBN_ROWS ? rows : m0 + SYNCBN_ROWS;                         \\
            for (c = 0; c + 16 <= C; c += 16) {                                             \\
                M0 = SYNCBN_LOAD4(mu + c);     M1 = SYNCBN_LOAD4(mu + c + 4);               \\
                M2 = SYNCBN_LOAD4(mu + c + 8); M3 = SYNCBN_LOAD4(mu + c + 12);              \\
                v0 = v1 = v2 = v3 = w0 = w1 = w2 = w3 = syncbn_zero;                        \\
                for (m = m0, o = m0 * C + c; m < m1; m++, o += C) {                         \\
                    g = SYNCBN_LOAD4(dy + o);      v0 += g;                                 \\
                    w0 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o), M0);                          \\
                    g = SYNCBN_LOAD4(dy + o + 4);  v1 += g;                                 \\
                    w1 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o + 4), M1);                      \\
                    g = SYNCBN_LOAD4(dy + o + 8);  v2 += g;                                 \\
                    w2 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o + 8), M2);                      \\
                    g = SYNCBN_LOAD4(dy + o + 12); v3 += g;                                 \\
                    w3 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o + 12), M3);                     \\
                }                                                                           \\
                SYNCBN_ADD4(s1 + c, v0);      SYNCBN_ADD4(s2 + c, w0);                      \\
                SYNCBN_ADD4(s1 + c + 4, v1);  SYNCBN_ADD4(s2 + c + 4, w1);                  \\
                SYNCBN_ADD4(s1 + c + 8, v2);  SYNCBN_ADD4(s2 + c + 8, w2);                  \\
                SYNCBN_ADD4(s1 + c + 12, v3); SYNCBN_ADD4(s2 + c + 12, w3);                 \\
            }                                                                               \\
            for (; c + 4 <= C; c += 4) {                                                    \\
                M0 = SYNCBN_LOAD4(mu + c);                                                  \\
                v0 = v1 = w0 = w1 = syncbn_zero;                                            \\
                for (m = m0, o = m0 * C + c; m + 2 <= m1; m += 2, o += 2 * C) {             \\
                    g = SYNCBN_LOAD4(dy + o);      v0 += g;                                 \\
                    w0 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o), M0);                          \\
                    g = SYNCBN_LOAD4(dy + o + C);  v1 += g;                                 \\
                    w1 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o + C), M0);                      \\
                }                                                                           \\
                if (m < m1) {                                                               \\
                    g = SYNCBN_LOAD4(dy + o);      v0 += g;                                 \\
                    w0 += g * SYNCBN_SUB(SYNCBN_LOAD4(x + o), M0);                          \\
                }                                                                           \\
                v0 += v1;                                                                   \\
                w0 += w1;                                                                   \\
                SYNCBN_ADD4(s1 + c, v0);      SYNCBN_ADD4(s2 + c, w0);                      \\
            }                                                                               \\
            for (; c < C; c++) {                                                            \\
                a0 = a1 = b0 = b1 = 0.0;                                                    \\
                for (m = m0, o = m0 * C + c; m + 2 <= m1; m += 2, o += 2 * C) {             \\
                    h = (double)dy[o];             a0 += h;                                 \\
                    b0 += h * ((double)x[o] - mu[c]);                                       \\
                    h = (double)dy[o + C];         a1 += h;                                 \\
                    b1 += h * ((double)x[o + C] - mu[c]);                                   \\
                }                                                                           \\
                if (m < m1) {                                                               \\
                    h = (double)dy[o];             a0 += h;                                 \\
                    b0 += h * ((double)x[o] - mu[c]);                                       \\
                }                                                                           \\
                s1[c] += a0 + a1;                                                           \\
                s2[c] += b0 + b1;                                                           \\
            }                                                                               \\
        }                                                                                   \\
    }                                                                                       \\
                                                                                            \\
    /* element-wise: each value is loaded before its own result is stored, so out           \\
       may be x (or z) itself */                                                            \\
    static void syncbn_affine_##S(const T* x, T* out, Py_ssize_t n, double a, double k) {   \\
        const syncbn_v4d A = {a, a, a, a}, K = {k, k, k, k};                                \\
        syncbn_v4d y0, y1, y2, y3;                                                          \\
        Py_ssize_t i = 0;                                                                   \\
        for (; i + 16 <= n; i += 16) {                                                      \\
            y0 = SYNCBN_LOAD4(x + i) * A + K;                                               \\
            y1 = SYNCBN_LOAD4(x + i + 4) * A + K;                                           \\
            y2 = SYNCBN_LOAD4(x + i + 8) * A + K;                                           \\
            y3 = SYNCBN_LOAD4(x + i + 12) * A + K;                                          \\
            SYNCBN_STORE4(out + i, y0, T);     SYNCBN_STORE4(out + i + 4, y1, T);           \\
            SYNCBN_STORE4(out + i + 8, y2, T); SYNCBN_STORE4(out + i + 12, y3, T);          \\
        }                                                                                   \\
        for (; i + 4 <= n; i += 4) {                                                        \\
            y0 = SYNCBN_LOAD4(x + i) * A + K;                                               \\
            SYNCBN_STORE4(out + i, y0, T);                                                  \\
        }                                                                                   \\
        for (; i < n; i++)                                                                  \\
            out[i] = (T)((double)x[i] * a + k);                                             \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_affine2_##S(const T* x, const T* z, T* out, Py_ssize_t n,            \\
                                   double a, double b, double k) {                          \\
        const syncbn_v4d A = {a, a, a, a}, B = {b, b, b, b}, K = {k, k, k, k};              \\
        syncbn_v4d y0, y1;                                                                  \\
        Py_ssize_t i = 0;                                                                   \\
        for (; i + 8 <= n; i += 8) {                                                        \\
            y0 = SYNCBN_LOAD4(x + i) * A + (SYNCBN_LOAD4(z + i) * B + K);                   \\
            y1 = SYNCBN_LOAD4(x + i + 4) * A + (SYNCBN_LOAD4(z + i + 4) * B + K);           \\
            SYNCBN_STORE4(out + i, y0, T);     SYNCBN_STORE4(out + i + 4, y1, T);           \\
        }                                                                                   \\
        for (; i + 4 <= n; i += 4) {                                                        \\
            y0 = SYNCBN_LOAD4(x + i) * A + (SYNCBN_LOAD4(z + i) * B + K);                   \\
            SYNCBN_STORE4(out + i, y0, T);                                                  \\
        }                                                                                   \\
        for (; i < n; i++)                                                                  \\
            out[i] = (T)((double)x[i] * a + ((double)z[i] * b + k));                        \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_rows_affine_##S(const T* x, T* out, Py_ssize_t rows, Py_ssize_t C,   \\
                                       const double* a, const double* k) {                  \\
        syncbn_v4d y0, y1;                                                                  \\
        Py_ssize_t m, c;                                                                    \\
        for (m = 0; m < rows; m++, x += C, out += C) {                                      \\
            for (c = 0; c + 8 <= C; c += 8) {                                               \\
                y0 = SYNCBN_LOAD4(x + c) * SYNCBN_LOAD4(a + c) + SYNCBN_LOAD4(k + c);       \\
                y1 = SYNCBN_LOAD4(x + c + 4) * SYNCBN_LOAD4(a + c + 4) + SYNCBN_LOAD4(k + c + 4); \\
                SYNCBN_STORE4(out + c, y0, T); SYNCBN_STORE4(out + c + 4, y1, T);           \\
            }                                                                               \\
            for (; c < C; c++)                                                              \\
                out[c] = (T)((double)x[c] * a[c] + k[c]);                                   \\
        }                                                                                   \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_rows_affine2_##S(const T* x, const T* z, T* out, Py_ssize_t rows,    \\
                                        Py_ssize_t C, const double* a, const double* b,     \\
                                        const double* k) {                                  \\
        syncbn_v4d y0;                                                                      \\
        Py_ssize_t m, c;                                                                    \\
        for (m = 0; m < rows; m++, x += C, z += C, out += C) {                              \\
            for (c = 0; c + 4 <= C; c += 4) {                                               \\
                y0 = SYNCBN_LOAD4(x + c) * SYNCBN_LOAD4(a + c)                              \\
                     + (SYNCBN_LOAD4(z + c) * SYNCBN_LOAD4(b + c) + SYNCBN_LOAD4(k + c));   \\
                SYNCBN_STORE4(out + c, y0, T);                                              \\
            }                                                                               \\
            for (; c < C; c++)                                                              \\
                out[c] = (T)((double)x[c] * a[c] + ((double)z[c] * b[c] + k[c]));           \\
        }                                                                                   \\
    }

    #else  /* plain C: the same sums, without the vector types */
    #define SYNCBN_VECTOR_EXT 0

    #define SYNCBN_DEFINE(S, T)                                                             \\
    static double syncbn_lanes_sum_##S(const double* a) {                                   \\
        double t = 0.0;                                                                     \\
        int j;                                                                              \\
        for (j = 0; j < SYNCBN_LANES; j++)                                                  \\
            t += a[j];                                                                      \\
        return t;                                                                           \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_moments_##S(const T* x, Py_ssize_t runs, Py_ssize_t stride,          \\
                                   Py_ssize_t n, double p, double* s1, double* s2) {        \\
        double a[SYNCBN_LANES] = {0}, b[SYNCBN_LANES] = {0}, u, tv = 0.0, tw = 0.0;         \\
        Py_ssize_t r, i, j;                                                                 \\
        for (r = 0; r < runs; r++, x += stride) {                                           \\
            for (i = 0; i + SYNCBN_LANES <= n; i += SYNCBN_LANES)                           \\
                for (j = 0; j < SYNCBN_LANES; j++) {                                        \\
                    u = (double)x[i + j] - p;                                               \\
                    a[j] += u;                                                              \\
                    b[j] += u * u;                                                          \\
                }                                                                           \\
            for (; i < n; i++) {                                                            \\
                u = (double)x[i] - p;                                                       \\
                tv += u;                                                                    \\
                tw += u * u;                                                                \\
            }                                                                               \\
        }                                                                                   \\
        *s1 += syncbn_lanes_sum_##S(a) + tv;                                                \\
        *s2 += syncbn_lanes_sum_##S(b) + tw;                                                \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_dot_##S(const T* dy, const T* x, Py_ssize_t runs,                    \\
                               Py_ssize_t stride, Py_ssize_t n, double mu,                  \\
                               double* s1, double* s2) {                                    \\
        double a[SYNCBN_LANES] = {0}, b[SYNCBN_LANES] = {0}, h, tv = 0.0, tw = 0.0;         \\
        Py_ssize_t r, i, j;                                                                 \\
        for (r = 0; r < runs; r++, dy += stride, x += stride) {                             \\
            for (i = 0; i + SYNCBN_LANES <= n; i += SYNCBN_LANES)                           \\
                for (j = 0; j < SYNCBN_LANES; j++) {                                        \\
                    h = (double)dy[i + j];                                                  \\
                    a[j] += h;                                                              \\
                    b[j] += h * ((double)x[i + j] - mu);                                    \\
                }                                                                           \\
            for (; i < n; i++) {                                                            \\
                h = (double)dy[i];                                                          \\
                tv += h;                                                                    \\
                tw += h * ((double)x[i] - mu);                                              \\
            }                                                                               \\
        }                                                                                   \\
        *s1 += syncbn_lanes_sum_##S(a) + tv;                                                \\
        *s2 += syncbn_lanes_sum_##S(b) + tw;                                                \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_cols_moments_##S(const T* x, Py_ssize_t rows, Py_ssize_t C,          \\
                                        const double* p, double* s1, double* s2) {          \\
        Py_ssize_t m, c;                                                                    \\
        double u;                                                                           \\
        for (m = 0; m < rows; m++, x += C)                                                  \\
            for (c = 0; c < C; c++) {                                                       \\
                u = (double)x[c] - p[c];                                                    \\
                s1[c] += u;                                                                 \\
                s2[c] += u * u;                                                             \\
            }                                                                               \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_cols_dot_##S(const T* dy, const T* x, Py_ssize_t rows,               \\
                                    Py_ssize_t C, const double* mu, double* s1,             \\
                                    double* s2) {                                           \\
        Py_ssize_t m, c;                                                                    \\
        double h;                                                                           \\
        for (m = 0; m < rows; m++, dy += C, x += C)                                         \\
            for (c = 0; c < C; c++) {                                                       \\
                h = (double)dy[c];                                                          \\
                s1[c] += h;                                                                 \\
                s2[c] += h * ((double)x[c] - mu[c]);                                        \\
            }                                                                               \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_affine_##S(const T* x, T* out, Py_ssize_t n, double a, double k) {   \\
        Py_ssize_t i;                                                                       \\
        for (i = 0; i < n; i++)                                                             \\
            out[i] = (T)((double)x[i] * a + k);                                             \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_affine2_##S(const T* x, const T* z, T* out, Py_ssize_t n,            \\
                                   double a, double b, double k) {                          \\
        Py_ssize_t i;                                                                       \\
        for (i = 0; i < n; i++)                                                             \\
            out[i] = (T)((double)x[i] * a + ((double)z[i] * b + k));                        \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_rows_affine_##S(const T* x, T* out, Py_ssize_t rows, Py_ssize_t C,   \\
                                       const double* a, const double* k) {                  \\
        Py_ssize_t m, c;                                                                    \\
        for (m = 0; m < rows; m++, x += C, out += C)                                        \\
            for (c = 0; c < C; c++)                                                         \\
                out[c] = (T)((double)x[c] * a[c] + k[c]);                                   \\
    }                                                                                       \\
                                                                                            \\
    static void syncbn_rows_affine2_##S(const T* x, const T* z, T* out, Py_ssize_t rows,    \\
                                        Py_ssize_t C, const double* a, const double* b,     \\
                                        const double* k) {                                  \\
        Py_ssize_t m, c;                                                                    \\
        for (m = 0; m < rows; m++, x += C, z += C, out += C)                                \\
            for (c = 0; c < C; c++)                                                         \\
                out[c] = (T)((double)x[c] * a[c] + ((double)z[c] * b[c] + k[c]));           \\
    }
    #endif

    SYNCBN_DEFINE(f, float)
    SYNCBN_DEFINE(d, double)
    """
    const int SYNCBN_VECTOR_EXT
    void syncbn_moments_f(const float* x, Py_ssize_t runs, Py_ssize_t stride, Py_ssize_t n,
                          double p, double* s1, double* s2) noexcept nogil
    void syncbn_moments_d(const double* x, Py_ssize_t runs, Py_ssize_t stride, Py_ssize_t n,
                          double p, double* s1, double* s2) noexcept nogil
    void syncbn_dot_f(const float* dy, const float* x, Py_ssize_t runs, Py_ssize_t stride,
                      Py_ssize_t n, double mu, double* s1, double* s2) noexcept nogil
    void syncbn_dot_d(const double* dy, const double* x, Py_ssize_t runs, Py_ssize_t stride,
                      Py_ssize_t n, double mu, double* s1, double* s2) noexcept nogil
    void syncbn_cols_moments_f(const float* x, Py_ssize_t rows, Py_ssize_t C, const double* p,
                               double* s1, double* s2) noexcept nogil
    void syncbn_cols_moments_d(const double* x, Py_ssize_t rows, Py_ssize_t C, const double* p,
                               double* s1, double* s2) noexcept nogil
    void syncbn_cols_dot_f(const float* dy, const float* x, Py_ssize_t rows, Py_ssize_t C,
                           const double* mu, double* s1, double* s2) noexcept nogil
    void syncbn_cols_dot_d(const double* dy, const double* x, Py_ssize_t rows, Py_ssize_t C,
                           const double* mu, double* s1, double* s2) noexcept nogil
    void syncbn_affine_f(const float* x, float* out, Py_ssize_t n, double a,
                         double k) noexcept nogil
    void syncbn_affine_d(const double* x, double* out, Py_ssize_t n, double a,
                         double k) noexcept nogil
    void syncbn_affine2_f(const float* x, const float* z, float* out, Py_ssize_t n, double a,
                          double b, double k) noexcept nogil
    void syncbn_affine2_d(const double* x, const double* z, double* out, Py_ssize_t n,
                          double a, double b, double k) noexcept nogil
    void syncbn_rows_affine_f(const float* x, float* out, Py_ssize_t rows, Py_ssize_t C,
                              const double* a, const double* k) noexcept nogil
    void syncbn_rows_affine_d(const double* x, double* out, Py_ssize_t rows, Py_ssize_t C,
                              const double* a, const double* k) noexcept nogil
    void syncbn_rows_affine2_f(const float* x, const float* z, float* out, Py_ssize_t rows,
                               Py_ssize_t C, const double* a, const double* b,
                               const double* k) noexcept nogil
    void syncbn_rows_affine2_d(const double* x, const double* z, double* out,
                               Py_ssize_t rows, Py_ssize_t C, const double* a,
                               const double* b, const double* k) noexcept nogil


cdef enum:
    # Elements per thread below which another thread costs more than it saves.
    GRAIN = 32768
    # Smallest piece a run is cut into when runs are fewer than threads need.
    MIN_PIECE = 4096
    # Runs at least this long are reduced in memory order, one horizontal sum
    # per run, which streams (2.4x faster for (32, 64, 32, 32), 8 MB); shorter
    # runs channel by channel, all N runs of a channel in one call.
    STREAM_MIN_L = 256


def openmp_enabled() -> bool:
    """Whether the extension was compiled with OpenMP."""
    return SYNCBN_OPENMP == 1


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


cdef double* _vec(str name, object v, Py_ssize_t n, bint allow_none=False,
                  bint writeable=False) except? NULL:
    """Check a float64 vector of length n; return its data (NULL for an allowed None)."""
    if v is None and allow_none:
        return NULL
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
    return <double*>cnp.PyArray_DATA(a)


# ---------------------------------------------------------------------------
# the C primitives for either dtype
# ---------------------------------------------------------------------------

cdef inline void _moments(
    const floating* x,      # IN  runs x n values, stride apart
    Py_ssize_t runs,        # IN
    Py_ssize_t stride,      # IN
    Py_ssize_t n,           # IN
    double p,               # IN  pivot
    double* s1,             # OUT += sum(x - p)
    double* s2,             # OUT += sum((x - p)^2)
) noexcept nogil:
    if floating is float:
        syncbn_moments_f(x, runs, stride, n, p, s1, s2)
    else:
        syncbn_moments_d(x, runs, stride, n, p, s1, s2)


cdef inline void _cols_moments(
    const floating* x,      # IN  (rows, C)
    Py_ssize_t rows,        # IN
    Py_ssize_t C,           # IN
    const double* p,        # IN  (C,) pivot
    double* s1,             # OUT (C,) += sum(x - p)
    double* s2,             # OUT (C,) += sum((x - p)^2)
) noexcept nogil:
    if floating is float:
        syncbn_cols_moments_f(x, rows, C, p, s1, s2)
    else:
        syncbn_cols_moments_d(x, rows, C, p, s1, s2)


cdef inline void _dot(
    const floating* dy,     # IN  runs x n values, stride apart
    const floating* x,      # IN  like dy
    Py_ssize_t runs,        # IN
    Py_ssize_t stride,      # IN
    Py_ssize_t n,           # IN
    double mu,              # IN
    double* s1,             # OUT += sum(dy)
    double* s2,             # OUT += sum(dy * (x - mu))
) noexcept nogil:
    if floating is float:
        syncbn_dot_f(dy, x, runs, stride, n, mu, s1, s2)
    else:
        syncbn_dot_d(dy, x, runs, stride, n, mu, s1, s2)


cdef inline void _cols_dot(
    const floating* dy,     # IN  (rows, C)
    const floating* x,      # IN  (rows, C)
    Py_ssize_t rows,        # IN
    Py_ssize_t C,           # IN
    const double* mu,       # IN  (C,)
    double* s1,             # OUT (C,) += sum(dy)
    double* s2,             # OUT (C,) += sum(dy * (x - mu))
) noexcept nogil:
    if floating is float:
        syncbn_cols_dot_f(dy, x, rows, C, mu, s1, s2)
    else:
        syncbn_cols_dot_d(dy, x, rows, C, mu, s1, s2)


cdef inline void _affine_run(
    const floating* x,      # IN  n values
    const floating* z,      # IN  n values, or NULL
    floating* out,          # OUT n values
    Py_ssize_t n,           # IN
    double a,               # IN  coefficient of x
    double b,               # IN  coefficient of z
    double k,               # IN  constant
) noexcept nogil:
    if floating is float:
        if z == NULL:
            syncbn_affine_f(x, out, n, a, k)
        else:
            syncbn_affine2_f(x, z, out, n, a, b, k)
    else:
        if z == NULL:
            syncbn_affine_d(x, out, n, a, k)
        else:
            syncbn_affine2_d(x, z, out, n, a, b, k)


cdef inline void _affine_rows(
    const floating* x,      # IN  (rows, C)
    const floating* z,      # IN  (rows, C), or NULL
    floating* out,          # OUT (rows, C)
    Py_ssize_t rows,        # IN
    Py_ssize_t C,           # IN
    const double* a,        # IN  (C,) coefficient of x
    const double* b,        # IN  (C,) coefficient of z
    const double* k,        # IN  (C,) constant
) noexcept nogil:
    if floating is float:
        if z == NULL:
            syncbn_rows_affine_f(x, out, rows, C, a, k)
        else:
            syncbn_rows_affine2_f(x, z, out, rows, C, a, b, k)
    else:
        if z == NULL:
            syncbn_rows_affine_d(x, out, rows, C, a, k)
        else:
            syncbn_rows_affine2_d(x, z, out, rows, C, a, b, k)


# ---------------------------------------------------------------------------
# the work split
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


@cython.cdivision(True)
cdef Py_ssize_t _pieces(Py_ssize_t runs, Py_ssize_t L, int nt) noexcept nogil:
    """Pieces per run: about 8 per thread when runs are few, none under MIN_PIECE."""
    if nt <= 1 or runs >= 8 * nt:
        return 1
    cdef Py_ssize_t s = (8 * nt + runs - 1) // runs
    cdef Py_ssize_t most = (L + MIN_PIECE - 1) // MIN_PIECE
    return s if s < most else most


@cython.cdivision(True)
cdef Py_ssize_t _piece_len(Py_ssize_t L, Py_ssize_t S) noexcept nogil:
    """Piece length: L / S rounded up to whole blocks of 16 values."""
    cdef Py_ssize_t p = (L + S - 1) // S
    return (p + 15) // 16 * 16


cdef inline Py_ssize_t _sums_stride(Py_ssize_t C) noexcept nogil:
    """Doubles per share of the scratch: 2C sums, padded to whole cache lines."""
    return (2 * C + 15) // 8 * 8


@cython.cdivision(True)
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


# ---------------------------------------------------------------------------
# 1. local statistics: count, sum(x - shift), sum((x - shift)^2)
# ---------------------------------------------------------------------------

@cython.cdivision(True)
cdef void _stats_share(
    const floating* x,      # IN  (N, C, L) or (M, C)
    const Split* sp,        # IN
    const double* piv,      # IN  (C,) pivot: the first value of each channel
    Py_ssize_t t,           # IN  share
    double* s1,             # OUT (C,) += sum(x - piv), zeroed
    double* s2,             # OUT (C,) += sum((x - piv)^2), zeroed
) noexcept nogil:
    cdef Py_ssize_t N = sp.N, C = sp.C, L = sp.L, S = sp.S, P = sp.P
    cdef Py_ssize_t k = _share(sp.units, t, sp.nt), k1 = _share(sp.units, t + 1, sp.nt)
    cdef Py_ssize_t c, n, r, s, m, off
    if L == 0:
        _cols_moments(x + k * C, k1 - k, C, piv, s1, s2)
    elif L >= STREAM_MIN_L or S > 1:
        # memory order: run r = n * C + c, piece s
        r = k // S
        c = r % C
        s = k % S
        while k < k1:
            off = s * P
            if off < L:
                _moments(x + r * L + off, 1, 0, min(P, L - off), piv[c], &s1[c], &s2[c])
            k += 1
            s += 1
            if s == S:
                s = 0
                r += 1
                c += 1
                if c == C:
                    c = 0
    else:
        # channel by channel, run k = c * N + n: the runs n .. n + m of
        # channel c in one call
        c = k // N
        n = k % N
        while k < k1:
            m = min(k1 - k, N - n)
            _moments(x + (n * C + c) * L, m, C * L, L, piv[c], &s1[c], &s2[c])
            k += m
            n = 0
            c += 1


cdef void _stats(
    const floating* x,      # IN  (N, C, L) or (M, C)
    const Split* sp,        # IN
    double* s1,             # OUT (C,) sum(x - piv)
    double* s2,             # OUT (C,) sum((x - piv)^2)
    double* piv,            # OUT (C,) pivot: the first value of each channel
    double* sums,           # TMP zeroed: nt shares of _sums_stride(C)
) noexcept nogil:
    cdef Py_ssize_t C = sp.C, c, t, stride = _sums_stride(C)
    cdef double* w
    cdef double v
    for c in range(C):
        v = <double>x[c * sp.L] if sp.L > 0 else <double>x[c]
        # a non-finite pivot would turn every x - pivot into NaN (inf - inf),
        # even where the true sums are +-inf; 0 lets them come out as they should
        piv[c] = v if isfinite(v) else 0.0
    if sp.nt == 1:
        # no parallel region: even a one-thread team costs microseconds
        _stats_share(x, sp, piv, 0, s1, s2)
        return
    for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
        _stats_share(x, sp, piv, t, sums + t * stride, sums + t * stride + C)
    for t in range(sp.nt):
        w = sums + t * stride
        for c in range(C):
            s1[c] += w[c]
            s2[c] += w[C + c]


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
    here, or 0 if that is not finite), so the float64 sums never cancel
    catastrophically however large ``|mean| / std`` is; they are then moved
    to ``shift`` in float64. The result stays accurate as long as
    ``|mean - shift| / std`` is well below 1e8, and is exact in the count.
    Empty input gives zeros.
    """
    cdef Py_ssize_t C = _check_data("x", x)
    cdef const double* sh = _vec("shift", shift, C)
    cdef double* o = _vec("out", out, 2 * C + 1, False, True)
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef Py_ssize_t count = cnp.PyArray_SIZE(a) // C if C > 0 else 0
    cdef Py_ssize_t c
    cdef double d, n = <double>count
    cdef void* data = cnp.PyArray_DATA(a)
    cdef bint single = cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32
    cdef Split sp
    cdef double* piv
    cdef double* sums
    for c in range(2 * C):
        o[c] = 0.0
    o[2 * C] = n
    if count == 0:
        return
    sp = _split(a, num_threads, 1)
    sums = <double*>calloc(C + (sp.nt * _sums_stride(C) if sp.nt > 1 else 0), sizeof(double))
    if sums == NULL:
        raise MemoryError()
    piv = sums
    with nogil:
        if single:
            _stats(<const float*>data, &sp, o, o + C, piv, sums + C)
        else:
            _stats(<const double*>data, &sp, o, o + C, piv, sums + C)
        # move from the pivot p to the common shift s: with d = p - s,
        # sum(x - s) = S1 + n d,  sum((x - s)^2) = S2 + 2 d S1 + n d^2
        for c in range(C):
            d = piv[c] - sh[c]
            if d != 0.0:    # (and an infinite sum stays as it is)
                o[C + c] = o[C + c] + d * (2.0 * o[c] + n * d)
                o[c] = o[c] + n * d
    free(sums)


# ---------------------------------------------------------------------------
# 2 and 4. per-channel affine passes
#    forward:  y  = x * a + k
#    backward: dx = dy * a + (x * b + k)
# ---------------------------------------------------------------------------

@cython.cdivision(True)
cdef void _affine_share(
    const floating* x,      # IN  (N, C, L) or (M, C)
    const floating* z,      # IN  like x, or NULL
    floating* out,          # OUT like x
    const Split* sp,        # IN
    const double* coef,     # IN  (3C,) [coefficient of x, of z, constant]
    Py_ssize_t t,           # IN  share
) noexcept nogil:
    cdef Py_ssize_t C = sp.C, L = sp.L, S = sp.S, P = sp.P
    cdef Py_ssize_t k = _share(sp.units, t, sp.nt), k1 = _share(sp.units, t + 1, sp.nt)
    cdef Py_ssize_t r, c, s, off
    cdef const double* a = coef
    cdef const double* b = coef + C
    cdef const double* kc = coef + 2 * C
    if L == 0:
        _affine_rows(x + k * C, z + k * C if z != NULL else NULL, out + k * C, k1 - k, C,
                     a, b, kc)
        return
    # pieces in memory order: run r = n * C + c, piece s
    r = k // S
    c = r % C
    s = k % S
    while k < k1:
        off = s * P
        if off < L:
            _affine_run(x + r * L + off, z + r * L + off if z != NULL else NULL,
                        out + r * L + off, min(P, L - off), a[c], b[c], kc[c])
        k += 1
        s += 1
        if s == S:
            s = 0
            r += 1
            c += 1
            if c == C:
                c = 0


cdef void _affine(
    const floating* x,      # IN  (N, C, L) or (M, C)
    const floating* z,      # IN  like x, or NULL
    floating* out,          # OUT like x
    const Split* sp,        # IN
    const double* coef,     # IN  (3C,)
) noexcept nogil:
    cdef Py_ssize_t t
    if sp.nt == 1:
        _affine_share(x, z, out, sp, coef, 0)
        return
    for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
        _affine_share(x, z, out, sp, coef, t)


cdef int _affine_pass(cnp.ndarray x, cnp.ndarray z, cnp.ndarray out, const double* coef,
                      int num_threads) except -1:
    """Thread split and dtype dispatch of an affine pass (z None: the forward form)."""
    cdef Split sp = _split(x, num_threads, 1)
    cdef void* xd = cnp.PyArray_DATA(x)
    cdef void* zd = cnp.PyArray_DATA(z) if z is not None else NULL
    cdef void* od = cnp.PyArray_DATA(out)
    with nogil:
        if cnp.PyArray_TYPE(x) == cnp.NPY_FLOAT32:
            _affine(<const float*>xd, <const float*>zd, <float*>od, &sp, coef)
        else:
            _affine(<const double*>xd, <const double*>zd, <double*>od, &sp, coef)
    return 0


def normalize(
    x,                      # IN  (N, C, L) or (M, C), float32/float64, C-contiguous
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float64 or None (= 1)
    bias,                   # IN  (C,) float64 or None (= 0)
    out,                    # OUT like x (may be x itself)
    int num_threads=0,
):
    """``out = (x - mean) * invstd * weight + bias``, one pass.

    Weight, bias, mean and invstd are folded into one float64 scale and
    offset per channel; the arithmetic is float64, so a large ``|mean|``
    costs no accuracy, and the result is rounded once to the dtype of x.
    """
    cdef Py_ssize_t C = _check_data("x", x)
    _check_same("out", out, "x", <cnp.ndarray>x, True)
    cdef const double* mu = _vec("mean", mean, C)
    cdef const double* inv = _vec("invstd", invstd, C)
    cdef const double* w = _vec("weight", weight, C, True)
    cdef const double* b = _vec("bias", bias, C, True)
    cdef Py_ssize_t c
    cdef double* coef
    if cnp.PyArray_SIZE(<cnp.ndarray>x) == 0:
        return
    coef = <double*>malloc(3 * C * sizeof(double))
    if coef == NULL:
        raise MemoryError()
    for c in range(C):
        coef[c] = inv[c] * w[c] if w != NULL else inv[c]
        coef[C + c] = 0.0
        coef[2 * C + c] = -mu[c] * coef[c] + (b[c] if b != NULL else 0.0)
    try:
        _affine_pass(<cnp.ndarray>x, None, <cnp.ndarray>out, coef, num_threads)
    finally:
        free(coef)


def backward_input(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    invstd,                 # IN  (C,) float64
    weight,                 # IN  (C,) float64 or None (= 1)
    mean_dy,                # IN  (C,) float64: global sum(dy) / count
    mean_dy_xmu,            # IN  (C,) float64: global sum(dy * (x - mean)) / count
    out,                    # OUT like x: gradient of the input (may be dy or x itself)
    int num_threads=0,
):
    """``out = (dy - mean_dy - (x - mean) * invstd**2 * mean_dy_xmu) * invstd * weight``.

    Folded into ``dy * a + x * b + k`` per channel, float64 arithmetic, one pass.
    """
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", <cnp.ndarray>dy)
    _check_same("out", out, "dy", <cnp.ndarray>dy, True)
    cdef const double* mu = _vec("mean", mean, C)
    cdef const double* inv = _vec("invstd", invstd, C)
    cdef const double* w = _vec("weight", weight, C, True)
    cdef const double* mdy = _vec("mean_dy", mean_dy, C)
    cdef const double* mdx = _vec("mean_dy_xmu", mean_dy_xmu, C)
    cdef Py_ssize_t c
    cdef double a
    cdef double* coef
    if cnp.PyArray_SIZE(<cnp.ndarray>dy) == 0:
        return
    coef = <double*>malloc(3 * C * sizeof(double))
    if coef == NULL:
        raise MemoryError()
    for c in range(C):
        a = inv[c] * w[c] if w != NULL else inv[c]
        coef[c] = a
        coef[C + c] = -a * inv[c] * inv[c] * mdx[c]
        coef[2 * C + c] = -a * mdy[c] - coef[C + c] * mu[c]
    try:
        _affine_pass(<cnp.ndarray>dy, <cnp.ndarray>x, <cnp.ndarray>out, coef, num_threads)
    finally:
        free(coef)


# ---------------------------------------------------------------------------
# 3. backward reductions: sum(dy), sum(dy * (x - mean))
# ---------------------------------------------------------------------------

@cython.cdivision(True)
cdef void _dot_share(
    const floating* dy,     # IN  (N, C, L) or (M, C)
    const floating* x,      # IN  like dy
    const Split* sp,        # IN
    const double* mean,     # IN  (C,)
    Py_ssize_t t,           # IN  share
    double* s1,             # OUT (C,) += sum(dy), zeroed
    double* s2,             # OUT (C,) += sum(dy * (x - mean)), zeroed
) noexcept nogil:
    cdef Py_ssize_t N = sp.N, C = sp.C, L = sp.L, S = sp.S, P = sp.P
    cdef Py_ssize_t k = _share(sp.units, t, sp.nt), k1 = _share(sp.units, t + 1, sp.nt)
    cdef Py_ssize_t c, n, r, s, m, off
    if L == 0:
        _cols_dot(dy + k * C, x + k * C, k1 - k, C, mean, s1, s2)
    elif L >= STREAM_MIN_L or S > 1:
        r = k // S
        c = r % C
        s = k % S
        while k < k1:
            off = s * P
            if off < L:
                off += r * L
                _dot(dy + off, x + off, 1, 0, min(P, L - s * P), mean[c], &s1[c], &s2[c])
            k += 1
            s += 1
            if s == S:
                s = 0
                r += 1
                c += 1
                if c == C:
                    c = 0
    else:
        c = k // N
        n = k % N
        while k < k1:
            m = min(k1 - k, N - n)
            off = (n * C + c) * L
            _dot(dy + off, x + off, m, C * L, L, mean[c], &s1[c], &s2[c])
            k += m
            n = 0
            c += 1


cdef void _backward_sums(
    const floating* dy,     # IN  (N, C, L) or (M, C)
    const floating* x,      # IN  like dy
    const Split* sp,        # IN
    const double* mean,     # IN  (C,)
    double* s1,             # OUT (C,) sum(dy), zeroed
    double* s2,             # OUT (C,) sum(dy * (x - mean)), zeroed
    double* sums,           # TMP zeroed: nt shares of _sums_stride(C)
) noexcept nogil:
    cdef Py_ssize_t C = sp.C, c, t, stride = _sums_stride(C)
    cdef double* w
    if sp.nt == 1:
        _dot_share(dy, x, sp, mean, 0, s1, s2)
        return
    for t in prange(sp.nt, num_threads=sp.nt, schedule='static'):
        _dot_share(dy, x, sp, mean, t, sums + t * stride, sums + t * stride + C)
    for t in range(sp.nt):
        w = sums + t * stride
        for c in range(C):
            s1[c] += w[c]
            s2[c] += w[C + c]


def backward_reduce(
    dy,                     # IN  (N, C, L) or (M, C) gradient of the output
    x,                      # IN  like dy: the forward input
    mean,                   # IN  (C,) float64
    out,                    # OUT (2C,) float64: [sum(dy), sum(dy * (x - mean))]
    int num_threads=0,
):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in one pass, float64."""
    cdef Py_ssize_t C = _check_data("dy", dy)
    _check_same("x", x, "dy", <cnp.ndarray>dy)
    cdef const double* mu = _vec("mean", mean, C)
    cdef double* o = _vec("out", out, 2 * C, False, True)
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef Py_ssize_t c
    cdef void* gd = cnp.PyArray_DATA(<cnp.ndarray>dy)
    cdef void* xd = cnp.PyArray_DATA(a)
    cdef Split sp
    cdef double* sums = NULL
    for c in range(2 * C):
        o[c] = 0.0
    if cnp.PyArray_SIZE(a) == 0:
        return
    sp = _split(a, num_threads, 2)
    if sp.nt > 1:
        sums = <double*>calloc(sp.nt * _sums_stride(C), sizeof(double))
        if sums == NULL:
            raise MemoryError()
    with nogil:
        if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
            _backward_sums(<const float*>gd, <const float*>xd, &sp, mu, o, o + C, sums)
        else:
            _backward_sums(<const double*>gd, <const double*>xd, &sp, mu, o, o + C, sums)
    free(sums)
