"""The C++ autograd node of the training layer (syncbn/_cpp_node.cpp), when it can be used.

A training call goes to :data:`NODE` ``.forward`` first, with the
communicator when it has more than one process; the node takes the call when
the input and the layer's tensors are as the kernels read them (float32 /
float64, contiguous or channels-last, at least 2 values per channel in a
group of one and 1 in a larger group, the residual laid out as the input)
and returns None otherwise, having changed nothing, so that the Python
function takes it. Both run the same kernels and passes
(syncbn/_group_passes.py for a larger group), so they compute the same
values and issue the same collectives; the node saves the Python autograd
function around them.

The node is compiled against torch's C++ API, so it is used only with the
torch it was built against. :data:`STATUS` says whether it is in use, and
why not when it is not:

* not built: an isolated build (pip's default) has no torch to build
  against; ``pip install --no-build-isolation`` beside an installed torch
  builds it, as does ``SYNCBN_NO_CPP_NODE`` unset with a C++ compiler;
* built against another torch version than the one imported;
* ``SYNCBN_CPP_NODE=0`` in the environment (read at import).
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch

from . import _kernels
from ._environment import switched_off
from ._group_passes import group_backward, group_forward

__all__ = ["NODE", "STATUS"]


def _load() -> tuple[ModuleType | None, str]:
    if switched_off("SYNCBN_CPP_NODE"):
        return None, "off (SYNCBN_CPP_NODE=0)"
    if importlib.util.find_spec("syncbn._cpp_node") is None:
        return None, "not built (pip install --no-build-isolation builds it; see docs/design.md)"
    try:
        from . import _cpp_node
    except ImportError as error:
        return None, f"not loaded ({error})"
    if torch.__version__ != _cpp_node.TORCH_VERSION:
        return None, f"not used: built against torch {_cpp_node.TORCH_VERSION}, running {torch.__version__}"
    _cpp_node.bind(
        _kernels.local_forward,
        _kernels.local_backward,
        group_forward,
        group_backward,
        _kernels.activation_uses_output,
        _kernels.ACT_NONE,
    )
    return _cpp_node, "in use"


NODE, STATUS = _load()
