"""The C++ autograd node of the training layer (syncbn/_cpp_node.cpp).

A training call goes through the node when the tensors are as the kernels
read them, and through the Python function otherwise. In a group of several
processes (simulated ranks below; tests/dist_worker.py under the launchers)
the node runs the group's passes, and a rank whose call it leaves to Python
issues the same collectives. Both run the same kernels: here the node's
outputs, gradients and buffers are checked against the Python path's and
against torch's batch norm (with negative controls), and the calls the node
must leave to Python are checked to go there. The rest of the suite runs through the node wherever it takes a call.

Skipped where the node is not in use (an isolated build, as in the package
check, has none; the reason is syncbn.build_info()["cpp_node"]).
"""
from __future__ import annotations

import copy
import gc
import weakref
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F

import syncbn
from syncbn import _cpp_node_loader, function
from syncbn.comm import LocalCommunicator
from batchnorm_data import LAYOUTS, TOL, apply_activation, batch, misaligned, negated_view, set_random_affine
from simulated import SimulatedCommunicator, run_ranks

pytestmark = pytest.mark.skipif(
    _cpp_node_loader.NODE is None, reason=f"the C++ node is not in use: {_cpp_node_loader.STATUS}"
)

C = 3
NODE_NAME = "torch::autograd::CppNode<syncbn::BatchNormNode>"
ACTIVATIONS = [None, "relu", "relu6", "leaky_relu", "silu"]


def _node_taken(y: torch.Tensor) -> bool:
    return y.grad_fn is not None and y.grad_fn.name() == NODE_NAME


def _run(layer: syncbn.SyncBatchNorm, x: torch.Tensor, g: torch.Tensor,
         residual: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """One training step: output, every gradient and the layer's buffers."""
    x = x.clone().requires_grad_()
    r = None if residual is None else residual.clone().requires_grad_()
    y = layer(x) if r is None else layer(x, r)
    taken = _node_taken(y)
    y.backward(g)
    out = {"y": y.detach(), "x.grad": x.grad, "taken": taken}
    if r is not None:
        out["residual.grad"] = r.grad
    for name, p in layer.named_parameters():
        out[name + ".grad"] = p.grad
    out.update({name: b.clone() for name, b in layer.named_buffers()})
    return out


def _python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(function, "NODE", None)


def _compare(a: dict[str, Any], b: dict[str, Any], dtype: torch.dtype) -> None:
    for key in a:
        if key == "taken":
            continue
        torch.testing.assert_close(a[key], b[key], **TOL[dtype], msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_node_equals_python_path(monkeypatch: pytest.MonkeyPatch, layout: str, dtype: torch.dtype,
                                 activation: Optional[str], with_residual: bool) -> None:
    shape, _, fmt = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(1)
    x, g = batch(shape, gen, dtype, fmt)
    residual = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=fmt) if with_residual else None
    layer = syncbn.SyncBatchNorm(C, dtype=dtype, activation=activation, negative_slope=0.2,
                                 process_group="local")
    set_random_affine(layer, 1)
    twin = copy.deepcopy(layer)
    through_node = [_run(layer, x, g, residual) for _ in range(2)]
    _python_path(monkeypatch)
    through_python = [_run(twin, x, g, residual) for _ in range(2)]
    for a, b in zip(through_node, through_python):
        assert a["taken"] and not b["taken"]
        _compare(a, b, dtype)
    assert torch.equal(layer.num_batches_tracked, torch.tensor(2))
    assert torch.equal(torch.from_numpy(layer._shift), torch.from_numpy(twin._shift))


@pytest.mark.parametrize("options", [
    dict(affine=False), dict(momentum=None), dict(track_running_stats=False), dict(momentum=0.3),
])
def test_node_against_torch_batch_norm(options: dict[str, Any]) -> None:
    gen = torch.Generator().manual_seed(2)
    ours = syncbn.SyncBatchNorm(C, dtype=torch.float64, process_group="local", **options)
    ref = torch.nn.BatchNorm2d(C, dtype=torch.float64, **options)
    for step in range(3):
        x, g = batch((4, C, 5, 6), gen, torch.float64, torch.channels_last if step == 1 else torch.contiguous_format)
        a, b = _run(ours, x, g), _run(ref, x, g)
        assert a["taken"] and not b["taken"]
        _compare(a, b, torch.float64)


def test_comparison_with_torch_can_fail() -> None:
    # negative control: another eps gives other outputs, and the comparison says so
    gen = torch.Generator().manual_seed(3)
    x, g = batch((4, C, 5, 6), gen, torch.float64)
    a = _run(syncbn.SyncBatchNorm(C, eps=1e-1, dtype=torch.float64, process_group="local"), x, g)
    b = _run(torch.nn.BatchNorm2d(C, dtype=torch.float64), x, g)
    assert a["taken"]
    with pytest.raises(AssertionError, match="y"):
        _compare(a, b, torch.float64)


def test_running_statistics_are_versioned_like_torch_buffers() -> None:
    layer = syncbn.SyncBatchNorm(C, process_group="local")
    before = [layer.running_mean._version, layer.running_var._version, layer.num_batches_tracked._version]
    y = layer(torch.randn(4, C, 5, requires_grad=True))
    assert _node_taken(y)
    after = [layer.running_mean._version, layer.running_var._version, layer.num_batches_tracked._version]
    assert all(b > a for a, b in zip(before, after)), (before, after)


def _strided(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape[0], shape[2], shape[1], shape[3]).transpose(1, 2)


@pytest.mark.parametrize("make", [
    pytest.param(_strided, id="other strides"),
    pytest.param(lambda s: torch.randn(s, dtype=torch.float16), id="float16"),
    pytest.param(lambda s: torch.randn(s, dtype=torch.bfloat16), id="bfloat16"),
    pytest.param(lambda s: misaligned(torch.randn(s)), id="misaligned"),
    pytest.param(lambda s: negated_view(torch.randn(s)), id="negated"),
])
def test_calls_the_kernels_cannot_read_go_to_python(make: Any) -> None:
    shape = (4, C, 5, 6)
    x = make(shape)
    layer = syncbn.SyncBatchNorm(C, dtype=torch.float32, process_group="local")
    ref = torch.nn.BatchNorm2d(C)
    xa = x.detach().clone().requires_grad_()
    y = layer(x.detach().requires_grad_())
    assert y.grad_fn is not None and not _node_taken(y)
    torch.testing.assert_close(y.float(), ref(xa.float()), atol=1e-2, rtol=1e-2)


def test_frozen_parameters_and_residual_gradients() -> None:
    # which gradients the node computes follows which inputs need one
    gen = torch.Generator().manual_seed(4)
    x, g = batch((4, C, 5, 6), gen, torch.float64)
    r = torch.randn(4, C, 5, 6, generator=gen, dtype=torch.float64)
    ours = syncbn.SyncBatchNorm(C, dtype=torch.float64, activation="relu", process_group="local")
    ours.weight.requires_grad_(False)
    rr = r.clone().requires_grad_()
    y = ours(x, rr)  # x needs no gradient: only the residual and the bias do
    assert _node_taken(y)
    y.backward(g)
    xr = x.clone()
    ref = F.relu(F.batch_norm(xr, None, None, ours.weight, torch.zeros(C, dtype=torch.float64,
                                                                       requires_grad=True), True) + r)
    ref_grad = g * (ref > 0)
    torch.testing.assert_close(rr.grad, ref_grad)
    torch.testing.assert_close(ours.bias.grad, ref_grad.sum((0, 2, 3)))
    assert ours.weight.grad is None


@pytest.mark.parametrize("grad_form", ["channels_last", "expanded", "negated"])
def test_output_gradient_in_another_layout(grad_form: str) -> None:
    gen = torch.Generator().manual_seed(5)
    x, g = batch((4, C, 5, 6), gen, torch.float64)
    if grad_form == "channels_last":
        g_in = g.contiguous(memory_format=torch.channels_last)
    elif grad_form == "expanded":
        g = g[:1].expand_as(g)
        g_in = g
    else:
        g_in = negated_view(g)
    ours = syncbn.SyncBatchNorm(C, dtype=torch.float64, process_group="local")
    ref = torch.nn.BatchNorm2d(C, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = ours(a)
    assert _node_taken(ya)
    ya.backward(g_in)
    ref(b).backward(g)
    torch.testing.assert_close(a.grad, b.grad, **TOL[torch.float64])


def test_input_modified_in_place_before_backward_is_refused() -> None:
    layer = syncbn.SyncBatchNorm(C, process_group="local")
    leaf = torch.randn(4, C, 5, requires_grad=True)
    h = leaf * 1.0
    y = layer(h)
    assert _node_taken(y)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_is_refused() -> None:
    layer = syncbn.SyncBatchNorm(C, dtype=torch.float64, process_group="local")
    x = torch.randn(4, C, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _node_taken(y)
    gx, = torch.autograd.grad(y.pow(3).sum(), x, create_graph=True)
    assert gx.requires_grad
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (gx.square().sum() + x.sum()).backward()


def test_a_weight_of_another_length_is_still_refused() -> None:
    # (the node leaves it to the Python path, whose kernels refuse it)
    layer = syncbn.SyncBatchNorm(C, process_group="local")
    layer.weight = torch.nn.Parameter(torch.ones(C + 1))
    with pytest.raises(ValueError, match="weight"):
        layer(torch.randn(4, C, 5, requires_grad=True))


# --------------------------------------------------------------------------- #
# groups of several processes (simulated ranks: one thread each)              #
# --------------------------------------------------------------------------- #

GROUP_SIZES = [3, 0, 2]  # samples per rank: the empty rank takes the Python path


def _group_step(shape_rest: tuple[int, ...], fmt: torch.memory_format, activation: Optional[str],
                with_residual: bool, node: Any, synchronized: bool = True
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One training step of a layer on 3 simulated ranks (shards of one global
    batch), with ``function.NODE`` set to ``node``; each rank's results, and
    torch's composition on the whole batch (its outputs and gradients).
    ``synchronized=False``: each rank's layer is a group of one instead."""
    gen = torch.Generator().manual_seed(7)
    total = sum(GROUP_SIZES)
    xw, gw = batch((total, C, *shape_rest), gen, torch.float64, fmt)
    rw = torch.randn(xw.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    starts = [sum(GROUP_SIZES[:r]) for r in range(len(GROUP_SIZES))]

    def rank_fn(rank: int, comm: SimulatedCommunicator) -> dict[str, Any]:
        rows = slice(starts[rank], starts[rank] + GROUP_SIZES[rank])
        layer = syncbn.SyncBatchNorm(C, dtype=torch.float64, activation=activation,
                                     process_group=comm if synchronized else "local")
        set_random_affine(layer, 5)
        return _run(layer, xw[rows].contiguous(memory_format=fmt), gw[rows],
                    rw[rows].contiguous(memory_format=fmt) if with_residual else None)

    saved = function.NODE
    function.NODE = node
    try:
        per_rank = run_ranks(len(GROUP_SIZES), rank_fn)
    finally:
        function.NODE = saved
    ref = torch.nn.BatchNorm2d(C, dtype=torch.float64) if len(shape_rest) == 2 else torch.nn.BatchNorm1d(
        C, dtype=torch.float64)
    set_random_affine(ref, 5)
    x = xw.clone().requires_grad_()
    r = rw.clone().requires_grad_() if with_residual else None
    y = apply_activation(ref(x) if r is None else ref(x) + r, activation, 0.01)
    y.backward(gw)
    whole = {"y": y.detach(), "x.grad": x.grad, "residual.grad": None if r is None else r.grad,
             "weight.grad": ref.weight.grad, "bias.grad": ref.bias.grad, "running_mean": ref.running_mean,
             "running_var": ref.running_var}
    return per_rank, whole


def _check_against_whole(per_rank: list[dict[str, Any]], whole: dict[str, Any]) -> None:
    starts = [sum(GROUP_SIZES[:r]) for r in range(len(GROUP_SIZES) + 1)]
    tol = TOL[torch.float64]
    for rank, out in enumerate(per_rank):
        rows = slice(starts[rank], starts[rank + 1])
        for key in ("y", "x.grad", "residual.grad"):
            if key in out:
                torch.testing.assert_close(out[key], whole[key][rows], **tol, msg=lambda m, k=key: f"{k}: {m}")
        for key in ("running_mean", "running_var"):
            torch.testing.assert_close(out[key], whole[key], **tol)
    # parameter gradients are local sums: their sum over the ranks is the whole batch's
    for key in ("weight.grad", "bias.grad"):
        summed = sum(out[key] for out in per_rank if out[key] is not None)
        torch.testing.assert_close(summed, whole[key], **tol)


@pytest.mark.parametrize("layout", ["4d", "channels_last", "3d"])
@pytest.mark.parametrize("activation,with_residual", [(None, False), ("relu", True), ("silu", False)])
def test_node_in_a_group_of_three_equals_torch_on_the_whole_batch(
        layout: str, activation: Optional[str], with_residual: bool) -> None:
    shape, _, fmt = LAYOUTS[layout]
    through_node, whole = _group_step(shape[2:], fmt, activation, with_residual, _cpp_node_loader.NODE)
    # the ranks with samples went through the node, the empty one through Python
    assert [out["taken"] for out in through_node] == [n > 0 for n in GROUP_SIZES]
    _check_against_whole(through_node, whole)
    through_python, _ = _group_step(shape[2:], fmt, activation, with_residual, None)
    assert not any(out["taken"] for out in through_python)
    for a, b in zip(through_node, through_python):
        _compare(a, b, torch.float64)


def test_comparison_in_a_group_can_fail() -> None:
    # negative control: each rank normalizing its shard alone is not the whole batch's answer
    shape, _, fmt = LAYOUTS["4d"]
    per_rank, whole = _group_step(shape[2:], fmt, None, False, _cpp_node_loader.NODE, synchronized=False)
    assert per_rank[0]["taken"]
    with pytest.raises(AssertionError, match="y"):
        _check_against_whole(per_rank, whole)


class _PretendPair(LocalCommunicator):
    """A group of 2 whose allreduce does nothing (one process)."""

    _size = 2


def test_node_keeps_the_communicator_until_its_graph_is_freed() -> None:
    comm = _PretendPair()
    layer = syncbn.SyncBatchNorm(C, process_group=comm)
    y = layer(torch.randn(4, C, 5, requires_grad=True))
    assert _node_taken(y)
    kept = weakref.ref(comm)
    del layer, comm
    gc.collect()
    assert kept() is not None  # the node holds it for the backward
    y.sum().backward()
    assert kept().calls == 2  # type: ignore[union-attr]
    del y
    gc.collect()
    assert kept() is None
