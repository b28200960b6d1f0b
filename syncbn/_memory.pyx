# cython: language_level=3
"""NumPy arrays over a tensor's memory, made from its address.

``Tensor.numpy()`` costs a few microseconds with warm caches and tens of
microseconds with the cold caches a layer finds inside a network (the
convolution before it has evicted them), and a training call needs one for
every tensor the kernels read or write. ``array_over`` makes the same view
from the address alone, in well under a microsecond.

It cannot see the tensor's strides: the caller vouches that the memory at
``address`` holds a C-contiguous array of ``shape`` and ``dtype``, which
syncbn/_views.py does by looking the tensor's shape, strides and dtype up
in its cache of layouts, each found once through ``Tensor.numpy()``. What
it can check, it checks: the number of dimensions, the dtype, the sizes and
a null address; a misaligned one (a tensor from ``torch.frombuffer`` at an
odd offset) gets no array, and the caller copies.

The array keeps ``owner`` (the tensor) alive, as ``Tensor.numpy()``'s does.
"""

cimport numpy as cnp
from libc.stdint cimport uintptr_t

cnp.import_array()


def array_over(object owner, uintptr_t address, tuple shape, int typenum):
    """A writeable C-contiguous array of ``shape`` (1 to 3 sizes) and NumPy
    type number ``typenum`` (NPY_FLOAT32, NPY_FLOAT64) over the memory at
    ``address``, whose lifetime ``owner`` holds; None if ``address`` is not
    aligned to the dtype's size."""
    cdef cnp.npy_intp dims[3]
    cdef int nd = len(shape)
    cdef Py_ssize_t itemsize, size = 1, i
    if nd < 1 or nd > 3:
        raise ValueError(f"array_over: expected 1 to 3 sizes (got shape {shape})")
    if typenum == cnp.NPY_FLOAT32:
        itemsize = 4
    elif typenum == cnp.NPY_FLOAT64:
        itemsize = 8
    else:
        raise TypeError(f"array_over: expected the type number of float32 or float64 (got {typenum})")
    for i in range(nd):
        dims[i] = shape[i]
        if dims[i] < 0:
            raise ValueError(f"array_over: expected sizes of at least 0 (got shape {shape})")
        size *= dims[i]
    if size == 0:
        # no memory to view (a tensor without elements may have no address)
        return cnp.PyArray_EMPTY(nd, dims, typenum, 0)
    if address == 0:
        raise ValueError(f"array_over: expected the address of {size} values (got a null address)")
    if address % itemsize != 0:
        return None
    cdef cnp.ndarray array = cnp.PyArray_SimpleNewFromData(nd, dims, typenum, <void*>address)
    cnp.set_array_base(array, owner)
    return array
