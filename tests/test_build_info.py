"""syncbn.build_info(): the keys, their types, and agreement with the build.

The flags come from the compiled extension; they are checked against what the
extension reports about itself (OpenMP, Cython checks), against the installed
package's metadata (version), and against the variants and -march that
setup.py chooses from SYNCBN_MARCH (so run the tests with the environment the
build had). The choice among the variants is tested in test_kernel_variants.py.
"""
from __future__ import annotations

import os
from importlib.metadata import version as installed_version
from typing import Optional

import syncbn
from syncbn import _kernels, _variants

TYPES = {
    "version": str,
    "compiler": str,
    "compile_flags": str,
    "march": (str, type(None)),
    "openmp": bool,
    "cython_checks": bool,
    "kernel_variant": str,
    "kernel_variants": list,
    "kernel_choice": str,
    "cpp_node": str,
}
# the variants of the portable build (SYNCBN_MARCH unset), in setup.py's order
PORTABLE = ["generic", "x86-64-v3", "x86-64-v4"]


def _expected_march() -> Optional[str]:
    """The one -march setup.py asks for: SYNCBN_MARCH, None when empty or unset (the
    portable build, whose variants' -march values test_portable_variants checks)."""
    return os.environ.get("SYNCBN_MARCH", "").strip() or None


def test_keys_and_types() -> None:
    info = syncbn.build_info()
    assert set(info) == set(TYPES)
    for key, types in TYPES.items():
        assert isinstance(info[key], types), f"{key}: expected {types} (got {info[key]!r})"
    assert info["compiler"] and info["compiler"] != "unknown", info["compiler"]


def test_a_new_dict_each_call() -> None:
    info = syncbn.build_info()
    info["version"] = "changed"
    assert syncbn.build_info()["version"] == syncbn.__version__


def test_version_is_the_installed_one() -> None:
    assert syncbn.build_info()["version"] == syncbn.__version__ == installed_version("syncbn")


def test_flags_are_setup_py_s() -> None:
    # setup.py always passes -O3 first; the fallback text means the macro was missing
    flags = syncbn.build_info()["compile_flags"]
    assert flags.split()[0] == "-O3", flags


def test_openmp_agrees_with_the_extension() -> None:
    info = syncbn.build_info()
    assert info["openmp"] is _kernels.openmp_enabled()
    # the flag that was passed and the _OPENMP macro the compiler then defined
    assert ("-fopenmp" in info["compile_flags"].split()) is info["openmp"], info["compile_flags"]


def test_cython_checks_agree_with_the_extension() -> None:
    assert syncbn.build_info()["cython_checks"] is _kernels.cython_checks_enabled()


def test_march_is_the_one_asked_for() -> None:
    info = syncbn.build_info()
    expected = _expected_march()
    marches = [w for w in info["compile_flags"].split() if w.startswith("-march=")]
    if expected is None:
        # the portable build or SYNCBN_MARCH= (empty): a variant's -march is its name
        if info["kernel_variant"] == "generic":
            assert marches == [], info["compile_flags"]
            assert info["march"] is None
        else:
            assert marches == [f"-march={info['kernel_variant']}"], info["compile_flags"]
            assert info["march"] == info["kernel_variant"]
    else:
        assert marches == [f"-march={expected}"], (
            f"expected -march={expected} from SYNCBN_MARCH (got {info['compile_flags']!r}); "
            "run the tests with the environment the extension was built with")
        assert info["march"] == expected
        assert info["kernel_variant"] == expected


def test_variants_are_the_ones_asked_for() -> None:
    info = syncbn.build_info()
    built = info["kernel_variants"]
    if "SYNCBN_MARCH" not in os.environ:
        # the x86-64 levels the compiler takes, so at least the baseline
        assert built == PORTABLE[:len(built)] and built, built
    else:
        assert built == [_expected_march() or "generic"], (
            f"expected the one variant of SYNCBN_MARCH={os.environ['SYNCBN_MARCH']!r} "
            f"(got {built}); run the tests with the environment the extension was built with")


def test_the_loaded_variant_is_the_choice() -> None:
    info = syncbn.build_info()
    assert info["kernel_variant"] == _variants.CHOICE.variant == _kernels.build_variant()
    assert info["kernel_variant"] in info["kernel_variants"]
    assert info["kernel_choice"] == _variants.CHOICE.reason
    assert _kernels.__name__ == _variants.module_name(info["kernel_variant"])
