"""Contenders of ``scripts/bench_net.py``: what each does to the batch-norm layers of a network.

A contender is one entry of :data:`MODES`: a function that takes a fresh
copy of the network (plain ``torch.nn.BatchNorm2d`` everywhere, the same
initial weights for every contender) and returns the network to train, or
None when it cannot run here (not installed). Adding a contender is adding
one entry.

``floor`` is the lockstep floor: unsynchronized torch batch norm plus, at
every batch-norm layer, one 1-value float64 allreduce in the forward and one
in the backward through syncbn's default communicator. That is the waiting
any synchronized batch norm must do (every rank meets the others twice per
layer per step), with no statistics computed or exchanged, so a synchronized
layer is read against it rather than against zero.

``no BN`` is the network without batch norm (the identity in its place):
not a contender but the bound of what any batch norm, fused or not, can
save in a step.

``syncbn fused`` is ``syncbn`` converted with ``fuse=True``: the activation
(and residual add) after a batch norm runs inside the layer. The networks
use functional relu/relu6 and trace with torch.fx, so it is a
``torch.fx.GraphModule``; :data:`EXPECTED_FUSED` says how many of each
network's batch norms fuse (all but the shortcut projections' in the
ResNets, all but the linear projections' in MobileNetV2).
"""
from __future__ import annotations

import copy
from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import nn

from _bench_worker import _fairscale_sync_bn  # also puts a source checkout of syncbn on sys.path
import syncbn
from syncbn import Communicator

__all__ = ["EXPECTED_FUSED", "MODES", "LockstepBatchNorm2d", "Mode", "add_lockstep_floor", "build_contenders",
           "count_fused", "fairscale_sync_bn", "replace_batchnorms", "syncbn_fused", "without_batchnorm"]


class _Lockstep(torch.autograd.Function):
    """The identity, with one 1-value allreduce in the forward and one in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: Communicator) -> torch.Tensor:
        ctx.comm = comm
        comm.allreduce_(torch.ones(1, dtype=torch.float64))
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.comm.allreduce_(torch.ones(1, dtype=torch.float64))
        return grad, None


class LockstepBatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` (unsynchronized) that meets the other ranks once per pass."""

    def __init__(self, num_features: int, comm: Communicator, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.comm = comm

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _Lockstep.apply(super().forward(input), self.comm)


def replace_batchnorms(model: nn.Module, make: Callable[[nn.BatchNorm2d], nn.Module]) -> nn.Module:
    """Replace every ``BatchNorm2d`` child of ``model`` (recursively, in place) by ``make(bn)``,
    which receives the old layer's parameters and buffers (state_dict) and training flag."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            new = make(child)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(model, name, new)
        else:
            replace_batchnorms(child, make)
    return model


def add_lockstep_floor(model: nn.Module, comm: Optional[Communicator] = None) -> nn.Module:
    """The ``floor`` contender: every BatchNorm2d becomes a :class:`LockstepBatchNorm2d` on
    ``comm`` (default: syncbn's default communicator, ``syncbn.get_communicator(None)``)."""
    comm = syncbn.get_communicator(None) if comm is None else comm
    return replace_batchnorms(model, lambda bn: LockstepBatchNorm2d(
        bn.num_features, comm, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats))


def fairscale_sync_bn(model: nn.Module) -> Optional[nn.Module]:
    """fairscale's SyncBatchNorm (synchronizes over torch.distributed's default group), or None."""
    cls = _fairscale_sync_bn()
    if cls is None:
        return None
    return replace_batchnorms(model, lambda bn: cls(
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats))


class Mode(NamedTuple):
    """A contender: how it changes the network, and what it is, in a few words."""

    convert: Callable[[nn.Module], Optional[nn.Module]]
    description: str


def _unchanged(model: nn.Module) -> nn.Module:
    return model


def without_batchnorm(model: nn.Module) -> nn.Module:
    """The ``no BN`` bound: every BatchNorm2d replaced by the identity (the
    activations and residual adds stay torch's). What is left of the step is
    what no batch norm, fused or not, can make faster."""
    return replace_batchnorms(model, lambda bn: _Identity())


class _Identity(nn.Identity):
    """nn.Identity that takes (and ignores) the state_dict of the layer it replaces."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        pass


def syncbn_fused(model: nn.Module) -> nn.Module:
    """The ``syncbn fused`` contender: syncbn.convert_sync_batchnorm(model, fuse=True)."""
    return syncbn.convert_sync_batchnorm(model, fuse=True)


def count_fused(model: nn.Module) -> int:
    """Batch-norm layers of ``model`` that apply an activation themselves."""
    return sum(isinstance(m, syncbn.SyncBatchNorm) and m.activation is not None for m in model.modules())


# network -> batch norms that fuse: ResNet-20 9 blocks x 2 + the stem (not the 2
# shortcut projections); ResNet-18 8 x 2 + the stem (not the 3 projections);
# MobileNetV2 the stem, the last layer and every expansion and depthwise layer
# (16 x 2 + 1), not the 17 linear projections (their residual has no activation)
EXPECTED_FUSED = {"resnet20": 19, "mobilenet_v2": 35, "resnet18": 17}


# Every rank builds the contenders in this order (building one may be a
# collective: syncbn's default communicator sets up shared memory).
MODES: dict[str, Mode] = {
    "torch": Mode(_unchanged, "torch.nn.BatchNorm2d, unsynchronized"),
    "torch (A/A)": Mode(_unchanged, "the same, a second copy: the A/A control"),
    "floor": Mode(add_lockstep_floor, "torch BN + one 1-value allreduce per BN layer per pass"),
    "syncbn": Mode(syncbn.convert_sync_batchnorm, "syncbn.convert_sync_batchnorm, default communicator"),
    "syncbn fused": Mode(syncbn_fused, "the same with fuse=True: activation and residual add inside the layer"),
    "fairscale": Mode(fairscale_sync_bn, "fairscale.experimental.nn.SyncBatchNorm"),
    "no BN": Mode(without_batchnorm, "no batch norm at all (identity): the bound of what a BN can save"),
}


def build_contenders(base: nn.Module, names: list[str]) -> dict[str, Optional[nn.Module]]:
    """Each named contender from its own deep copy of ``base`` (None: not available here)."""
    return {name: MODES[name].convert(copy.deepcopy(base)) for name in names}
