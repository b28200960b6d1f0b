"""syncbn.build_info(): the keys, their types, and agreement with the build.

The flags come from the compiled extension; they are checked against what the
extension reports about itself (OpenMP, Cython checks), against the installed
package's metadata (version), and against the -march that setup.py chooses
from SYNCBN_MARCH (so run the tests with the environment the build had).
"""
from __future__ import annotations

import os
from importlib.metadata import version as installed_version
from typing import Optional

import syncbn
from syncbn import _kernels

TYPES = {
    "version": str,
    "compiler": str,
    "compile_flags": str,
    "march": (str, type(None)),
    "openmp": bool,
    "cython_checks": bool,
    "kernel_variant": str,
}


def _expected_march() -> Optional[str]:
    """The -march value setup.py asks for: SYNCBN_MARCH, "native" when unset, None when empty."""
    return os.environ.get("SYNCBN_MARCH", "native").strip() or None


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
        assert marches == [], info["compile_flags"]
        assert info["march"] is None
        assert info["kernel_variant"] == "generic"
    else:
        assert marches == [f"-march={expected}"], (
            f"expected -march={expected} from SYNCBN_MARCH (got {info['compile_flags']!r}); "
            "run the tests with the environment the extension was built with")
        assert info["march"] == expected
        assert info["kernel_variant"] == expected
