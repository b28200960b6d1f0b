"""Model conversion: every batch-norm layer of a model to :class:`SyncBatchNorm`, and back.

A layer is converted only if the synchronized layer computes what it did:
a subclass with a forward of its own is refused unless ``subclasses=`` says
what to do with it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Callable, Union

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.lazy import LazyModuleMixin

from .comm import CommSpec
from .module import BatchNorm, SyncBatchNorm

__all__ = ["SubclassRule", "convert_sync_batchnorm", "revert_sync_batchnorm"]

SubclassRule = Union[str, Callable[[_BatchNorm, CommSpec], nn.Module]]
"""A value of ``subclasses=``: ``"skip"``, or ``fn(layer, process_group) -> nn.Module``."""

# The forwards conversion knows, by the function a layer's class resolves
# ``forward`` to: what a SyncBatchNorm computes (torch's batch norm,
# torch.nn.SyncBatchNorm, syncbn.BatchNorm with its activation), and
# syncbn.SyncBatchNorm itself, left as it is.
_PLAIN, _TORCH_SYNC, _OURS, _OURS_SYNC = "batch norm", "torch.nn.SyncBatchNorm", "syncbn.BatchNorm", "syncbn"
_KNOWN_FORWARDS: dict[Callable[..., Any], str] = {
    _BatchNorm.forward: _PLAIN,
    nn.SyncBatchNorm.forward: _TORCH_SYNC,
    BatchNorm.forward: _OURS,
    SyncBatchNorm.forward: _OURS_SYNC,
}

# What a module can hold that changes what calling it does, or what its
# state_dict holds: a converted layer takes these over (the same objects, so
# the handles that registered them still remove them).
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _class_name(obj: object) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _where(path: str, layer: nn.Module) -> str:
    return f"{path!r} ({_class_name(layer)})" if path else f"the module itself ({_class_name(layer)})"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _known_forward(layer: nn.Module) -> str | None:
    """Which known forward ``layer`` runs (see _KNOWN_FORWARDS); None: its own."""
    if "forward" in vars(layer):  # an instance attribute: this one layer's forward was replaced
        return None
    return _KNOWN_FORWARDS.get(type(layer).forward)


def _hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` (empty: none)."""
    return [name.strip("_") for name in _HOOK_DICTS if name.endswith("hooks") and getattr(module, name, None)]


def _copy_state(src: _BatchNorm, dst: _BatchNorm) -> None:
    """Make ``dst`` share ``src``'s parameters, buffers and hooks (the same objects)."""
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
    for name in _HOOK_DICTS:
        if name in vars(src):
            vars(dst)[name] = vars(src)[name]


# ----------------------------------------------------------------------------- subclasses=


def _check_subclasses(subclasses: object) -> dict[type, SubclassRule]:
    """``subclasses=`` validated: exact class -> "skip" or a callable."""
    if subclasses is None:
        return {}
    if not isinstance(subclasses, Mapping):
        raise TypeError(
            "subclasses: expected a dict {batch-norm class: 'skip' or fn(layer, process_group) -> nn.Module} "
            f"(got {type(subclasses).__name__})"
        )
    rules: dict[type, SubclassRule] = {}
    for cls, rule in subclasses.items():
        if not (isinstance(cls, type) and issubclass(cls, _BatchNorm)):
            raise TypeError(
                "subclasses: expected batch-norm classes as keys (subclasses of "
                f"torch.nn.modules.batchnorm._BatchNorm) (got {cls!r})"
            )
        valid = rule == "skip" if isinstance(rule, str) else callable(rule)
        if not valid:
            raise (ValueError if isinstance(rule, str) else TypeError)(
                f"subclasses[{cls.__name__}]: expected 'skip' or a callable fn(layer, process_group) -> "
                f"torch.nn.Module (got {rule!r})"
            )
        rules[cls] = rule
    return rules


def _refusal(path: str, layer: _BatchNorm, rules: dict[type, SubclassRule]) -> Exception | None:
    """Why ``layer`` cannot be converted (None: it can)."""
    if type(layer) in rules:
        return None
    if isinstance(layer, LazyModuleMixin) and layer.has_uninitialized_params():
        return ValueError(
            f"convert_sync_batchnorm: {_where(path, layer)} is not initialized yet (a lazy layer takes "
            "its size from its first input): run one forward pass through the model, then convert it"
        )
    if _known_forward(layer) is None:
        name = type(layer).__name__
        what = (
            "this layer's forward was replaced" if "forward" in vars(layer) else "its class overrides forward"
        )
        return TypeError(
            f"convert_sync_batchnorm: cannot convert {_where(path, layer)}: {what}, so a "
            "SyncBatchNorm would not compute what it does. Say what to do with it in subclasses=: "
            f"{{{name}: 'skip'}} leaves such layers as they are (unsynchronized), {{{name}: fn}} "
            "replaces each with fn(layer, process_group) -> torch.nn.Module (see docs/fusion.md)"
        )
    return None


# ----------------------------------------------------------------------------- conversion


class _Converter:
    """One conversion: each module object converted once (shared ones stay shared)."""

    def __init__(self, process_group: CommSpec, rules: dict[type, SubclassRule]) -> None:
        self.process_group = process_group
        self.rules = rules
        self.done: dict[int, nn.Module] = {}
        self.skipped: list[str] = []

    def check(self, module: nn.Module, path: str, seen: set[int]) -> None:
        """Raise, before anything changes, if any layer cannot be converted."""
        if id(module) in seen:
            return
        seen.add(id(module))
        if isinstance(module, _BatchNorm):
            error = _refusal(path, module, self.rules)
            if error is not None:
                raise error
            if type(module) in self.rules:
                return  # skipped or the user's: its children are its own business
        for name, child in module._modules.items():
            if child is not None:
                self.check(child, _join(path, name), seen)

    def convert(self, module: nn.Module, path: str) -> nn.Module:
        if id(module) in self.done:
            return self.done[id(module)]
        out = module
        if isinstance(module, _BatchNorm):
            rule = self.rules.get(type(module))
            if rule == "skip":
                self.skipped.append(_where(path, module))
                self.done[id(module)] = module
                return module
            if callable(rule):
                out = rule(module, self.process_group)
                if not isinstance(out, nn.Module):
                    raise TypeError(
                        f"convert_sync_batchnorm: subclasses[{type(module).__name__}] returned "
                        f"{type(out).__name__} for {_where(path, module)} (expected a torch.nn.Module)"
                    )
                self.done[id(module)] = out
                return out
            if _known_forward(module) != _OURS_SYNC:
                out = _to_sync(module, self.process_group)
        self.done[id(module)] = out
        for name, child in list(module._modules.items()):
            if child is None:
                continue
            new = self.convert(child, _join(path, name))
            if new is not child or out is not module:
                out.add_module(name, new)
        return out


def _to_sync(layer: _BatchNorm, process_group: CommSpec) -> SyncBatchNorm:
    # syncbn.BatchNorm keeps its activation
    out = SyncBatchNorm(
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.affine,
        layer.track_running_stats,
        process_group,
        activation=layer.activation if isinstance(layer, BatchNorm) else None,
        negative_slope=layer.negative_slope if isinstance(layer, BatchNorm) else 0.01,
    )
    _copy_state(layer, out)
    return out


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: CommSpec = None,
    *,
    subclasses: Mapping[type[_BatchNorm], SubclassRule] | None = None,
) -> nn.Module:
    """Replace every batch-norm layer in ``module`` with :class:`SyncBatchNorm`.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` (BatchNorm1d/2d/3d,
    ``torch.nn.SyncBatchNorm``, lazy ones once initialized,
    :class:`syncbn.BatchNorm` with its activation) becomes a
    ``syncbn.SyncBatchNorm`` that shares the original parameter, buffer and
    hook objects and copies the training flag; ``syncbn.SyncBatchNorm``
    layers are left as they are, and so are other normalizations
    (InstanceNorm, GroupNorm, LayerNorm). A module object that appears at
    several places is converted once, and stays shared.

    A subclass whose ``forward`` is its own computes something a
    SyncBatchNorm would not: conversion raises a ``TypeError`` naming it
    (before changing anything) unless ``subclasses`` says what to do with it.

    Args:
        module: the model, or a single layer.
        process_group: passed to every new layer (see :class:`SyncBatchNorm`).
        subclasses: ``{cls: rule}`` for batch-norm classes (matched exactly,
            not their subclasses): ``"skip"`` leaves their layers as they are,
            unsynchronized, with a warning; a callable
            ``fn(layer, process_group) -> torch.nn.Module`` returns each one's
            replacement. It takes precedence over the rules above.

    Returns:
        The converted module: ``module`` itself, changed in place, unless it
        is a batch-norm layer.

    Example::

        >>> model = syncbn.convert_sync_batchnorm(model)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    converter = _Converter(process_group, _check_subclasses(subclasses))
    converter.check(module, "", set())
    out = converter.convert(module, "")
    if converter.skipped:
        warnings.warn(
            f"convert_sync_batchnorm: left {len(converter.skipped)} batch-norm layer(s) unsynchronized, "
            f"as subclasses= asks: {', '.join(converter.skipped)}; their statistics are those of each "
            "process's own batch",
            UserWarning,
            stacklevel=2,
        )
    return out


# ----------------------------------------------------------------------------- revert


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SyncBatchNorm` (ours or torch's) with plain batch norm.

    For single-process inference or export: every synchronized layer
    becomes a :class:`syncbn.BatchNorm` with the same activation that shares
    its parameters, buffers and hooks and copies its training flag. It
    accepts every input rank the synchronized layer did, so the same model
    runs unchanged. A subclass with a forward of its own is left as it is,
    with a warning.

    Returns:
        The reverted module (``module`` itself unless it is a sync layer).
    """
    left: list[str] = []
    out = _revert(module, "", {}, left)
    if left:
        warnings.warn(
            f"revert_sync_batchnorm: left {len(left)} layer(s) synchronized, as their forward is their "
            f"own and plain batch norm would not compute what it does: {', '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    return out


def _revert(module: nn.Module, path: str, done: dict[int, nn.Module], left: list[str]) -> nn.Module:
    if id(module) in done:
        return done[id(module)]
    out = module
    if isinstance(module, (SyncBatchNorm, nn.SyncBatchNorm)):
        if _known_forward(module) not in (_OURS_SYNC, _TORCH_SYNC):
            left.append(_where(path, module))
            done[id(module)] = module
            return module
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
    done[id(module)] = out
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _revert(child, _join(path, name), done, left)
        if new is not child or out is not module:
            out.add_module(name, new)
    return out
