"""syncbn: synchronized batch normalization for CPU training.

Cython kernels compute the per-channel statistics and the elementwise
passes; one float64 allreduce per pass (mpi4py or torch.distributed)
combines them across processes.
"""
from .comm import Communicator, get_communicator
from .module import SyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

__all__ = [
    "Communicator",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "get_communicator",
    "revert_sync_batchnorm",
]
__version__ = "0.1.0"
