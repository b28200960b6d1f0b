"""The torch.distributed backend: ``all_reduce`` (SUM) on a process group."""

from __future__ import annotations

from typing import Any

import torch

from .base import Communicator

__all__ = ["TorchCommunicator"]


class TorchCommunicator(Communicator):
    """``torch.distributed.all_reduce`` (SUM) on ``group`` (None: the default
    group); any backend, gloo on CPU included."""

    name = "torch"

    def __init__(self, group: Any = None) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchCommunicator: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group(...) first (torchrun sets up "
                "its environment), or use process_group='mpi' under mpirun"
            )
        self._dist = dist
        self.group = group
        self._rank = dist.get_rank(group)
        self._size = dist.get_world_size(group)

    def _allreduce(self, buf: torch.Tensor) -> None:
        if self._size > 1:
            self._dist.all_reduce(buf, op=self._dist.ReduceOp.SUM, group=self.group)
