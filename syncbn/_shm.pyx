# cython: language_level=3
"""The data path of SharedMemoryCommunicator: one allreduce through a segment.

The protocol (two data slots, one sequence flag per rank) is described in
:class:`syncbn.comm.SharedMemoryCommunicator`; this module only runs it, with
the memory ordering it needs made explicit: a release store publishes the
flag after the rank's row, acquire loads read the flags before the rows.
Those are C11/GCC atomics, so the protocol holds on weakly ordered CPUs
(ARM, POWER) as well as on x86, where they compile to plain moves.
"""
from libc.stdint cimport int64_t
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, nanosleep, timespec

cdef extern from *:
    """
    #include <stdint.h>
    #include <sched.h>
    static inline int64_t syncbn_load_acquire(const int64_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void syncbn_store_release(int64_t *p, int64_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    /* a hint to the core that this is a spin-wait loop (saves power, frees the sibling thread) */
    static inline void syncbn_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #elif defined(__aarch64__)
        __asm__ __volatile__("yield");
    #endif
    }
    """
    int64_t load_acquire "syncbn_load_acquire"(const int64_t *p) nogil
    void store_release "syncbn_store_release"(int64_t *p, int64_t v) nogil
    void cpu_relax "syncbn_cpu_relax"() nogil
    int sched_yield() nogil

# Checks of the flags before the first sched_yield: enough for ranks that are
# all running (a few microseconds), short enough not to steal the core from a
# rank that is not, when there are more ranks than cores.
cdef enum:
    SPINS = 200
# Then sched_yield between checks for this long; a wait that lasts longer is
# one for a rank that is computing or in a network collective (the leader
# of a host, in two levels across hosts). sched_yield keeps the waiter
# runnable, so with more ranks than cores it would still take turns on the
# core the others need: past this point the waiter sleeps between checks,
# which costs a wait of this length at most a sleep's wake-up more.
cdef double YIELD_SECONDS = 200e-6
cdef long SLEEP_NANOSECONDS = 20000


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


cdef inline bint _all_arrived(int64_t *flags, Py_ssize_t size, int64_t k) noexcept nogil:
    cdef Py_ssize_t r
    for r in range(size):
        if load_acquire(&flags[r]) < k:
            return False
    return True


def allreduce(int64_t[::1] flags, double[:, :, ::1] data, Py_ssize_t rank, int64_t k,
              double[::1] buf, double timeout):
    """Call ``k`` (1, 2, ...) of the protocol: sum ``buf`` over the ranks, in place.

    ``flags``: the segment's ``size`` sequence flags; ``data``: its two slots,
    shape ``(2, size, capacity)``. Writes ``buf`` into this rank's row of slot
    ``k % 2``, publishes ``flags[rank] = k`` (release), waits without the GIL
    until every flag is ``>= k`` (acquire), then sums the rows in rank order
    into ``buf``: the same bits on every rank.

    Returns the ranks that had not arrived after ``timeout`` seconds (then
    ``buf`` is left as it was), or an empty list.
    """
    cdef Py_ssize_t size = flags.shape[0], n = buf.shape[0], r, i, spins = 0
    if data.shape[0] != 2 or data.shape[1] != size or not 0 <= rank < size or k < 1:
        raise ValueError("allreduce: flags, data and rank do not describe one segment")
    if n > data.shape[2]:
        raise ValueError(f"allreduce: {n} values do not fit in a slot of {data.shape[2]}")
    cdef int64_t *f = &flags[0]
    cdef double *slot = &data[k % 2, 0, 0]
    cdef Py_ssize_t stride = data.shape[2]
    cdef double *out = &buf[0] if n else NULL
    cdef double *row
    cdef double deadline = 0.0, start, now, sleep_after = 0.0
    cdef timespec nap
    cdef bint arrived = True
    nap.tv_sec = 0
    nap.tv_nsec = SLEEP_NANOSECONDS
    with nogil:
        if n:
            memcpy(slot + rank * stride, out, n * sizeof(double))
        store_release(&f[rank], k)  # after the row: whoever sees k sees the row
        while not _all_arrived(f, size, k):
            if spins < SPINS:
                spins += 1
                cpu_relax()
                continue
            if spins == SPINS:
                spins += 1
                start = _now()
                deadline = start + timeout
                sleep_after = start + YIELD_SECONDS
            else:
                now = _now()
                if now > deadline:
                    arrived = False
                    break
                if now > sleep_after:
                    nanosleep(&nap, NULL)  # off the core until the others are done
                    continue
            sched_yield()  # let a rank that shares this core run
        if arrived and n:
            memcpy(out, slot, n * sizeof(double))
            for r in range(1, size):
                row = slot + r * stride
                for i in range(n):
                    out[i] += row[i]
    if arrived:
        return []
    return [r for r in range(size) if load_acquire(&f[r]) < k]
