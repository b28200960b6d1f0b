"""syncbn: synchronized batch normalization for CPU training.

Cython kernels compute the per-channel statistics and the elementwise
passes; one float64 allreduce per pass (mpi4py or torch.distributed)
combines them across processes.
"""

from ._build_info import build_info
from ._version import __version__ as __version__
from .comm import Communicator, get_communicator, new_groups
from .convert import convert_sync_batchnorm, revert_sync_batchnorm
from .launch import init_process_group_from_mpi
from .module import BatchNorm, SyncBatchNorm

__all__ = [
    "BatchNorm",
    "Communicator",
    "SyncBatchNorm",
    "build_info",
    "convert_sync_batchnorm",
    "get_communicator",
    "init_process_group_from_mpi",
    "new_groups",
    "revert_sync_batchnorm",
]
