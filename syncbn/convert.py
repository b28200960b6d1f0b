"""Model conversion: every batch-norm layer of a model to :class:`SyncBatchNorm`, and back."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .comm import CommSpec
from .module import BatchNorm, SyncBatchNorm

__all__ = ["convert_sync_batchnorm", "revert_sync_batchnorm"]


def _copy_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    """Make ``dst`` share ``src``'s parameters and buffers (the same objects)."""
    if src.affine:
        with torch.no_grad():
            dst.weight = src.weight
            dst.bias = src.bias
    dst.running_mean = src.running_mean
    dst.running_var = src.running_var
    dst.num_batches_tracked = src.num_batches_tracked
    dst.training = src.training
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig


def convert_sync_batchnorm(module: torch.nn.Module, process_group: CommSpec = None) -> torch.nn.Module:
    """Replace every batch-norm layer in ``module`` with :class:`SyncBatchNorm`.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
    ``torch.nn.SyncBatchNorm``, lazy ones once initialized) becomes a
    ``syncbn.SyncBatchNorm`` that shares the original parameter and buffer
    objects and copies the training flag; other normalizations
    (InstanceNorm, GroupNorm, LayerNorm) are left alone.

    Args:
        module: the model, or a single layer.
        process_group: passed to every new layer (see :class:`SyncBatchNorm`).

    Returns:
        The converted module (``module`` itself, changed in place, unless it
        is a batch-norm layer).

    Example::

        >>> model = syncbn.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        _copy_state(module, out)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            out.add_module(name, new)
    return out


def revert_sync_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every :class:`SyncBatchNorm` (ours or torch's) with plain batch norm.

    For single-process inference or export: every synchronized layer
    becomes a :class:`syncbn.BatchNorm` that shares its parameters and
    buffers and copies its training flag. It accepts every input rank the
    synchronized layer did, so the same model runs unchanged.

    Returns:
        The reverted module (``module`` itself unless it is a sync layer).
    """
    out = module
    if isinstance(module, (SyncBatchNorm, torch.nn.SyncBatchNorm)):
        out = BatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            activation=getattr(module, "activation", None),
            negative_slope=getattr(module, "negative_slope", 0.01),
        )
        _copy_state(module, out)
    for name, child in module.named_children():
        new = revert_sync_batchnorm(child)
        if new is not child:
            out.add_module(name, new)
    return out
