"""Typed stub of the compiled module syncbn._shm (see _shm.pyx)."""

import numpy as np
import numpy.typing as npt

def allreduce(
    flags: npt.NDArray[np.int64],
    data: npt.NDArray[np.float64],
    rank: int,
    k: int,
    buf: npt.NDArray[np.float64],
    timeout: float,
) -> list[int]: ...
