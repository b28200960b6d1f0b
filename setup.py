"""Build of the compiled core (everything else is in pyproject.toml): the kernels,
one extension syncbn._kernels_<variant> per variant, all from syncbn/_kernels_body.pxi;
syncbn._cpu, what the loader (syncbn/_variants.py) needs to choose one; syncbn._memory,
arrays over tensor memory; and syncbn._shm.

Environment variables:
  SYNCBN_NO_OPENMP=1     build without OpenMP (kernels run single-threaded)
  SYNCBN_CYTHON_CHECKS=1 keep Cython's bounds and wraparound checks (a memory-safety build)
  SYNCBN_MARCH=...       unset: the portable build, the variants "generic" (no -march) and,
                         on x86-64, "x86-64-v3" and "x86-64-v4" when the compiler takes them,
                         chosen at import by the CPU's features; set: one variant named after
                         the -march value (say "native"), or "generic" when empty or refused
  SYNCBN_VEC_REPORT=1    print gcc's vectorization report (-fopt-info-vec-optimized)
  SYNCBN_NO_CPP_NODE=1 do not build syncbn._cpp_node, even where torch is importable

syncbn._cpp_node, the C++ autograd node of the training layer, is built
against the torch that this build can import: with pip, `--no-build-isolation`
beside an installed torch (an isolated build has no torch, and the package then
runs its Python path alone). It needs a C++ compiler; without one it is skipped.
"""
import glob
import os
import re
import shutil
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


def _compiles_and_runs(flags: list[str], source: str = PROBE, compiler: str = "") -> bool:
    """Compile `source` with `flags` (by `compiler`, default the C compiler) and run it;
    True when both succeed."""
    cc = compiler or os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    suffix = ".cpp" if compiler else ".c"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe" + suffix)
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


# what the node's build needs of the C++ compiler beyond its existence
CXX20_PROBE = r"""
#include <optional>
#include <span>
int main() {
    int values[2] = {1, 2};
    std::span<int> view(values);
    std::optional<int> first = view[0];
    return *first == 1 ? 0 : 1;
}
"""


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


def _takes_march(march: str) -> bool:
    """Whether the compiler takes -march=`march` (whatever CPU builds: a login node may
    be older than the nodes that run the code, and the probe executes nothing of it)."""
    return _compiles_and_runs([f"-march={march}"], "int main(void){return 0;}")


# (variant, its -march or None), baseline first, best last: the order of preference.
GENERIC = "generic"
if "SYNCBN_MARCH" not in os.environ:
    variants = [(GENERIC, None)] + [(level, level) for level in ("x86-64-v3", "x86-64-v4")
                                    if _takes_march(level)]
else:
    march = os.environ["SYNCBN_MARCH"].strip()
    variants = [(march, march) if march and _takes_march(march) else (GENERIC, None)]

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

print(f"syncbn build: kernel variants {', '.join(v for v, _ in variants)}; OpenMP {openmp}; "
      f"compile {' '.join(compile_args)}; link {' '.join(link_args) or '-'}; "
      f"Cython checks {'on' if checks else 'off'}", file=sys.stderr)


def _c_string(text: str) -> str:
    """`text` as a C string literal, for a -D macro value."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _module(variant: str) -> str:
    """The extension of a variant (syncbn/_variants.py's module_name)."""
    return "_kernels_" + re.sub(r"\W", "_", variant)


# Each variant's .pyx is one line that includes the shared body, generated
# here (under build/, so never shipped nor committed) since the module name,
# which Cython compiles into the extension, differs per variant.
VARIANT_DIR = os.path.join("build", "kernel-variants")


def _variant_source(variant: str) -> str:
    path = os.path.join(VARIANT_DIR, _module(variant) + ".pyx")
    text = (f'"""syncbn\'s kernels, variant {variant} (see syncbn/_kernels.py)."""\n'
            f'include "_kernels_body.pxi"\n')
    os.makedirs(VARIANT_DIR, exist_ok=True)
    try:
        with open(path) as f:
            same = f.read() == text
    except OSError:
        same = False
    if not same:    # rewritten only when it changes, so cythonize's dates stay meaningful
        with open(path, "w") as f:
            f.write(text)
    return path


# The flags are compiled into each extension (syncbn.build_info() reads them
# from there), so what it reports is what built it, never a stale record.
kernel_exts = [
    Extension(
        f"syncbn.{_module(variant)}",
        [_variant_source(variant)],
        include_dirs=[numpy.get_include()],
        define_macros=macros + [("SYNCBN_BUILD_CFLAGS", _c_string(" ".join(flags))),
                                ("SYNCBN_KERNEL_VARIANT", _c_string(variant))],
        extra_compile_args=flags,
        extra_link_args=link_args,
    )
    for variant, march in variants
    for flags in [compile_args + ([f"-march={march}"] if march else [])]
]
# Built without -march, whatever the kernels get: the loader imports it first.
cpu_ext = Extension(
    "syncbn._cpu",
    ["syncbn/_cpu.pyx"],
    define_macros=[("SYNCBN_KERNEL_VARIANTS", _c_string(" ".join(v for v, _ in variants)))],
    extra_compile_args=["-O2"],
)
# Arrays over tensor memory (the per-call path's views): nothing to tune.
memory_ext = Extension(
    "syncbn._memory",
    ["syncbn/_memory.pyx"],
    include_dirs=[numpy.get_include()],
    define_macros=macros,
    extra_compile_args=["-O2"],
)
# The shared-memory allreduce: no OpenMP, no -march (it is loaded on every
# CPU), and no reassociation, since its contract is the sum in rank order
# (the same bits on every rank, and those of a plain left-to-right sum).
shm_ext = Extension(
    "syncbn._shm",
    ["syncbn/_shm.pyx"],
    define_macros=macros,
    extra_compile_args=[a for a in compile_args if a not in REASSOC and a != "-fopenmp"],
)


def _cpp_node_ext() -> "tuple[Extension | None, str]":
    """syncbn._cpp_node, built against the importable torch, or None, and why."""
    if _flag("SYNCBN_NO_CPP_NODE"):
        return None, "off (SYNCBN_NO_CPP_NODE)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return None, "off (no torch to build against: an isolated build; see pip's --no-build-isolation)"
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    if shutil.which(cxx.split()[0]) is None:
        return None, f"off (no C++ compiler: {cxx!r} not found)"
    if not _compiles_and_runs(["-std=c++20"], CXX20_PROBE, compiler=cxx):
        return None, f"off (the C++20 probe with {cxx!r} failed)"
    # (the torch version is compiled in: the loader uses the node only with the
    # torch it was built against, whose C++ ABI it shares)
    return Extension(
        "syncbn._cpp_node",
        ["syncbn/_cpp_node.cpp"],
        include_dirs=cpp_extension.include_paths(),
        library_dirs=cpp_extension.library_paths(),
        libraries=["c10", "torch", "torch_cpu", "torch_python"],
        define_macros=[
            ("SYNCBN_TORCH_VERSION", _c_string(torch.__version__)),
            ("TORCH_API_INCLUDE_EXTENSION_H", None),
            ("_GLIBCXX_USE_CXX11_ABI", str(int(torch._C._GLIBCXX_USE_CXX11_ABI))),
        ],
        extra_compile_args=["-O2", "-std=c++20"],
        language="c++",
    ), f"on (torch {torch.__version__})"


cpp_node_ext, cpp_node = _cpp_node_ext()
print(f"syncbn build: the C++ autograd node (syncbn._cpp_node) {cpp_node}", file=sys.stderr)

# The sources do not change when only the SYNCBN_* variables do, so the file
# dates alone would keep a stale build (say, one without OpenMP, or with the
# Cython checks, after switching back): rebuild whenever the configuration of
# the last build differs.
CONFIG = repr((variants, compile_args, link_args, macros, sorted(directives.items()), cpp_node))
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
        # syncbn._kernels.*.so of the builds before the variants would shadow the
        # loader syncbn/_kernels.py, and other variants' would be dead weight (the
        # loader loads only the variants of this build); a syncbn._cpp_node this
        # build did not make was built against a torch this build did not see
        self._remove_stale("_kernels", kernel_exts)
        self._remove_stale("_cpp_node", [cpp_node_ext] if cpp_node_ext is not None else [])
        os.makedirs(os.path.dirname(STAMP), exist_ok=True)
        with open(STAMP, "w") as f:
            f.write(CONFIG)


    def _remove_stale(self, prefix: str, exts: list[Extension]) -> None:
        """Remove the extensions syncbn/<prefix>* of other builds from where this
        build's went (an in-place build's syncbn/), keeping those of `exts`."""
        suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
        built = {os.path.abspath(self.get_ext_fullpath(e.name)) for e in exts}
        where = os.path.dirname(os.path.abspath(self.get_ext_fullpath("syncbn._cpu")))
        for path in glob.glob(os.path.join(where, prefix + "*" + suffix)):
            if os.path.abspath(path) not in built:
                os.remove(path)


setup(ext_modules=cythonize([*kernel_exts, cpu_ext, memory_ext, shm_ext], compiler_directives=directives,
                            include_path=["syncbn"],
                            # a changed directive must regenerate the C file
                            force=changed) + ([cpp_node_ext] if cpp_node_ext is not None else []),
      cmdclass={"build_ext": BuildExt})
