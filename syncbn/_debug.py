"""Debug mode: a cross-rank consistency check before the layer's collectives.

Without it, ranks that disagree on a layer (another width, one in eval, one
call fewer) pair the wrong collectives and either fail far from the cause or
go on with wrong statistics. With it, every forward first exchanges a small
fixed-size table of what each rank is about to do, and every rank raises the
same error when the table shows a difference, before any statistics are
exchanged; in training the same check also precedes the backward collective.
"""

from __future__ import annotations

import weakref
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .comm import CommSpec, Communicator, gather_values

if TYPE_CHECKING:
    from .module import SyncBatchNorm

__all__ = ["LayerCheck"]

_FORWARD, _BACKWARD = 1, 2
_DTYPE_CODES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}


class LayerCheck:
    """One layer's part in the check: its number and its call count.

    The number is the layer's order of construction among those built on
    the same process group in this process: equal on every rank that builds
    the same model, it tells apart two layers of equal width.
    """

    def __init__(self, process_group: CommSpec) -> None:
        self.layer_index = _next_layer_index(process_group)
        self.calls = 0

    def enter(self, layer: SyncBatchNorm, input: torch.Tensor) -> Communicator:
        """Check the forward that is starting; return the communicator its
        collectives go through, which checks again before the backward's.

        Runs before the layer validates its input, so that a bad input on
        one rank raises on every rank instead of leaving the others waiting.
        """
        self.calls += 1
        channels = input.shape[1] if input.dim() >= 2 else -1
        dtype_code = _DTYPE_CODES.get(input.dtype, -1)
        comm = layer.communicator
        self._check(layer, comm, channels, dtype_code, _FORWARD)
        return _CheckedBackward(self, layer, comm, channels, dtype_code)

    def _check(
        self, layer: SyncBatchNorm, comm: Communicator, channels: int, dtype_code: int, phase: int
    ) -> None:
        # The same fields, so the same buffer size, before forward and
        # backward collectives: a rank one collective ahead of the others
        # meets a check, never a statistics buffer.
        fields = {
            "layer (order of construction)": self.layer_index,
            "pass": phase,
            "num_features": layer.num_features,
            "input channels": channels,
            "input dtype": dtype_code,
            "training": int(layer.training),
            "calls of this layer": self.calls,
        }
        table = gather_values(comm, [float(v) for v in fields.values()]).numpy()
        differ = [k for k in range(len(fields)) if not bool((table[:, k] == table[0, k]).all())]
        if differ:
            raise RuntimeError(_message(layer, comm, list(fields), table, differ))


class _CheckedBackward(Communicator):
    """A layer's communicator in debug mode: forward collectives pass
    straight through (the forward was checked already); the backward's
    (``2C`` values, where the forward's have ``2C + 1``) are preceded by the
    check, so a rank that goes on to a backward while the others are in a
    forward raises on every rank instead of mixing buffers."""

    name = "debug"

    def __init__(
        self, check: LayerCheck, layer: SyncBatchNorm, inner: Communicator, channels: int, dtype_code: int
    ) -> None:
        super().__init__()
        self._check, self._layer, self._inner = check, layer, inner
        self._channels, self._dtype_code = channels, dtype_code
        self._rank, self._size = inner.rank, inner.size

    def _allreduce(self, buf: torch.Tensor) -> None:
        self._allreduce_array(buf.numpy())

    def _allreduce_array(self, buf: np.ndarray) -> None:
        if buf.shape[0] == 2 * self._channels:
            self._check._check(self._layer, self._inner, self._channels, self._dtype_code, _BACKWARD)
        self._inner.allreduce_array_(buf)


def _message(
    layer: SyncBatchNorm, comm: Communicator, names: list[str], table: np.ndarray, differ: list[int]
) -> str:
    lines = []
    for k in differ:
        by_value: dict[float, list[int]] = {}
        for r in range(comm.size):
            by_value.setdefault(float(table[r, k]), []).append(r)
        shown = ", ".join(f"{_show(names[k], v)} on ranks {ranks}" for v, ranks in by_value.items())
        lines.append(f"  {names[k]}: {shown}")
    return (
        f"SyncBatchNorm({layer.num_features}) consistency check failed on rank "
        f"{comm.rank} of {comm.size}: the ranks disagree on\n"
        + "\n".join(lines)
        + "\nEvery rank must call every synchronized layer the same number of times, in "
        "the same order and mode, with the same number of channels and dtype."
    )


def _show(field: str, value: float) -> str:
    if field == "input dtype":
        names = {code: str(dt) for dt, code in _DTYPE_CODES.items()}
        return names.get(int(value), "not floating point")
    if field == "training":
        return "train" if value else "eval"
    if field == "pass":
        return "forward" if value == _FORWARD else "backward"
    return str(int(value))


# Layer numbers: per process group (None or a name, or the group object
# itself, forgotten with it), the order of construction.
_LAYER_COUNTS: dict[Any, int] = {}
_LAYER_COUNTS_BY_OBJECT: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def _next_layer_index(spec: CommSpec) -> int:
    counts: MutableMapping[Any, int] = _LAYER_COUNTS
    key: Any = spec
    if spec is not None and not isinstance(spec, str):
        try:
            _LAYER_COUNTS_BY_OBJECT.get(spec)
            counts = _LAYER_COUNTS_BY_OBJECT
        except TypeError:  # not weak-referenceable
            key = ("object", id(spec))
    index = counts.get(key, 0)
    counts[key] = index + 1
    return index
