"""Typed stub of the compiled module syncbn._memory (see _memory.pyx)."""

import numpy as np
import numpy.typing as npt

def array_over(
    owner: object, address: int, shape: tuple[int, ...], typenum: int
) -> npt.NDArray[np.floating] | None:
    """A writeable C-contiguous array of ``shape`` (1 to 3 sizes) and NumPy
    type number ``typenum`` (NPY_FLOAT32, NPY_FLOAT64) over the memory at
    ``address``, whose lifetime ``owner`` holds; None if ``address`` is not
    aligned to the dtype's size."""
