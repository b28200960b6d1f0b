# The C++ autograd node of the training layer (syncbn/_cpp_node.cpp),
# loaded by syncbn/_cpp_node_loader.py.
from typing import Any, Callable

import numpy as np
import torch

TORCH_VERSION: str  # the torch version it was built against

def bind(
    local_forward: Callable[..., Any],
    local_backward: Callable[..., Any],
    group_forward: Callable[..., float],
    group_backward: Callable[..., None],
    activation_uses_output: Callable[[int, float], bool],
    act_none: int,
) -> None: ...
def forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    eps: float,
    momentum: float | None,
    shift: np.ndarray,
    activation: int,
    negative_slope: float,
    group: Any,  # None: a group of one process; else its syncbn.comm.Communicator
) -> torch.Tensor | None:
    """The training output, recorded as a C++ autograd node; None: the Python path takes the call."""
