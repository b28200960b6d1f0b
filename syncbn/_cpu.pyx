# cython: language_level=3
"""What the kernel loader (syncbn/_variants.py) must know before it imports
any kernels: the variants of the kernels this build compiled, and which of the
CPU features their instruction sets need the running CPU has.

Built without -march in every configuration (unlike the kernels), so it
imports on any CPU of its architecture. The features are read with the
compiler's __builtin_cpu_supports, which also checks that the operating
system saves the vector registers (AVX, AVX-512 state); on other
architectures, or with another compiler, no feature is reported and the
loader takes the baseline.
"""

cdef extern from *:
    """
    #include <string.h>
    #ifndef SYNCBN_KERNEL_VARIANTS
    #define SYNCBN_KERNEL_VARIANTS "unknown (built without setup.py)"
    #endif
    /* the features of x86-64-v3 and x86-64-v4 beyond the baseline's (the
       gcc names; x86-64-v2's are implied by them on every real CPU) */
    #define SYNCBN_CPU_FEATURES(X) X("avx") X("avx2") X("bmi") X("bmi2") X("f16c") X("fma") X("lzcnt") X("movbe") X("avx512f") X("avx512bw") X("avx512cd") X("avx512dq") X("avx512vl")
    #define SYNCBN_NAME(f) f " "
    static const char SYNCBN_KNOWN_FEATURES[] = SYNCBN_CPU_FEATURES(SYNCBN_NAME);
    static char syncbn_cpu_buffer[sizeof(SYNCBN_KNOWN_FEATURES)];
    static const char* syncbn_cpu_features(void) {
        syncbn_cpu_buffer[0] = 0;
    #if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
        __builtin_cpu_init();
        #define SYNCBN_HAS(f) if (__builtin_cpu_supports(f)) strcat(syncbn_cpu_buffer, f " ");
        SYNCBN_CPU_FEATURES(SYNCBN_HAS)
    #endif
        return syncbn_cpu_buffer;
    }
    """
    const char* SYNCBN_KERNEL_VARIANTS
    const char* SYNCBN_KNOWN_FEATURES
    const char* syncbn_cpu_features()


def kernel_variants() -> tuple:
    """The variants of the kernels this build compiled, baseline first, best last."""
    return tuple(SYNCBN_KERNEL_VARIANTS.decode("utf-8").split())


def known_features() -> frozenset:
    """The CPU features this module can detect."""
    return frozenset(SYNCBN_KNOWN_FEATURES.decode("utf-8").split())


def cpu_features() -> frozenset:
    """Those of known_features() that the running CPU (and its OS) supports."""
    return frozenset(syncbn_cpu_features().decode("utf-8").split())
