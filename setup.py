"""Build of the compiled core, syncbn._kernels and syncbn._shm (everything else is in pyproject.toml).

Environment variables:
  SYNCBN_NO_OPENMP=1     build without OpenMP (kernels run single-threaded)
  SYNCBN_CYTHON_CHECKS=1 keep Cython's bounds and wraparound checks (a memory-safety build)
  SYNCBN_MARCH=...       value for -march (default "native" when the compiler takes it;
                         set SYNCBN_MARCH= (empty) for a portable build, e.g. a wheel)
  SYNCBN_VEC_REPORT=1    print gcc's vectorization report (-fopt-info-vec-optimized)
"""
import os
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel num_threads(2) reduction(+:n)
    n += 1;
    printf("%d\n", n);
    return n == 2 ? 0 : 1;
}
"""


def _compiles_and_runs(flags: list[str], source: str = PROBE) -> bool:
    """Compile `source` with `flags` and run it; True when both succeed."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(src, "w") as f:
            f.write(source)
        try:
            subprocess.run(cc.split() + flags + [src, "-o", exe], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([exe], check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
    return True


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


compile_args = ["-O3"]

# The kernels' float64 reductions (sum(x - p), sum((x - p)^2), sum(dy * (x - mu)))
# vectorize only if the compiler may reorder their additions (3-6x faster with
# them). That is safe here: each x - p is computed once and reused, so
# reassociation only changes the order in which the float64 partial sums are
# added (as any SIMD sum does; the kernels bound the run length of each partial
# sum themselves). NaN and Inf keep their meaning: -ffinite-math-only is not used.
REASSOC = ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math",
           "-funroll-loops", "-fvariable-expansion-in-unroller"]
if _compiles_and_runs(REASSOC, "int main(void){return 0;}"):
    compile_args += REASSOC
link_args: list[str] = []

march = os.environ.get("SYNCBN_MARCH", "native").strip()
if march and _compiles_and_runs([f"-march={march}"], "int main(void){return 0;}"):
    compile_args.append(f"-march={march}")

if _flag("SYNCBN_NO_OPENMP"):
    openmp = "off (SYNCBN_NO_OPENMP)"
elif _compiles_and_runs(["-fopenmp"]):
    compile_args.append("-fopenmp")
    link_args.append("-fopenmp")
    openmp = "on"
else:
    openmp = "off (the compiler-and-run probe with -fopenmp failed)"

macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if _flag("SYNCBN_VEC_REPORT"):
    compile_args.append("-fopt-info-vec-optimized")

checks = _flag("SYNCBN_CYTHON_CHECKS")
macros.append(("SYNCBN_CYTHON_CHECKS", "1" if checks else "0"))
directives = {
    "language_level": 3,
    "boundscheck": checks,
    "wraparound": checks,
    "initializedcheck": checks,
    "cdivision": not checks,
    "embedsignature": True,
}

print(f"syncbn build: OpenMP {openmp}; compile {' '.join(compile_args)}; "
      f"link {' '.join(link_args) or '-'}; Cython checks {'on' if checks else 'off'}",
      file=sys.stderr)


def _c_string(text: str) -> str:
    """`text` as a C string literal, for a -D macro value."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# The flags are compiled into the extension (syncbn.build_info() reads them
# from there), so what it reports is what built it, never a stale record.
ext = Extension(
    "syncbn._kernels",
    ["syncbn/_kernels.pyx"],
    include_dirs=[numpy.get_include()],
    define_macros=macros + [("SYNCBN_BUILD_CFLAGS", _c_string(" ".join(compile_args)))],
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)
# The shared-memory allreduce: no OpenMP, and no reassociation, since its
# contract is the sum in rank order (the same bits on every rank, and those
# of a plain left-to-right sum).
shm_ext = Extension(
    "syncbn._shm",
    ["syncbn/_shm.pyx"],
    define_macros=macros,
    extra_compile_args=[a for a in compile_args if a not in REASSOC and a != "-fopenmp"],
)

# The sources do not change when only the SYNCBN_* variables do, so the file
# dates alone would keep a stale build (say, one without OpenMP, or with the
# Cython checks, after switching back): rebuild whenever the configuration of
# the last build differs.
CONFIG = repr((compile_args, link_args, macros, sorted(directives.items())))
STAMP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build",
                     "syncbn-build-config.txt")


def _last_config() -> str:
    try:
        with open(STAMP) as f:
            return f.read()
    except OSError:
        return ""


changed = _last_config() != CONFIG


class BuildExt(build_ext):
    """build_ext that also rebuilds when the build configuration changed."""

    def run(self) -> None:
        if changed:
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(STAMP), exist_ok=True)
        with open(STAMP, "w") as f:
            f.write(CONFIG)


setup(ext_modules=cythonize([ext, shm_ext], compiler_directives=directives,
                            # a changed directive must regenerate the C file
                            force=changed),
      cmdclass={"build_ext": BuildExt})
