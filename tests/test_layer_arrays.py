"""The layer's kept NumPy views of its parameters and buffers (``syncbn._views.LayerArrays``).

A view is reused while it still views the tensor's memory, and made anew
whenever the tensor, its memory, dtype or size changed. Each test checks the
outcome too: the layer against torch's batch norm with the same state, after
the change, so a stale view (one that reads or writes the old memory) fails.
"""
from __future__ import annotations

import copy
import pickle
from typing import Callable

import pytest
import torch
import torch.nn as nn

import syncbn
from syncbn._views import LayerArrays

C = 4


def _pair() -> tuple[syncbn.SyncBatchNorm, nn.BatchNorm2d]:
    ours = syncbn.SyncBatchNorm(C, process_group="local")
    ref = nn.BatchNorm2d(C)
    with torch.no_grad():
        for layer in (ours, ref):
            layer.weight.copy_(torch.tensor([0.5, 1.5, -2.0, 3.0]))
            layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 1.0]))
    return ours, ref


def _check_same(ours: syncbn.SyncBatchNorm, ref: nn.BatchNorm2d, seed: int) -> None:
    """One training step of both on the same batch: outputs, gradients, running statistics."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, C, 4, 5, generator=g) * 2 + 1
    dy = torch.randn(3, C, 4, 5, generator=g)
    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, yr = ours(xo), ref(xr)
    yo.backward(dy)
    yr.backward(dy)
    torch.testing.assert_close(yo, yr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xo.grad, xr.grad, atol=1e-5, rtol=1e-5)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, ref.running_mean.to(ours.running_mean.dtype))
    torch.testing.assert_close(ours.running_var, ref.running_var.to(ours.running_var.dtype))
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_a_view_is_reused_while_the_tensor_keeps_its_memory() -> None:
    arrays = LayerArrays()
    t = torch.ones(C)
    first = arrays.of("weight", t)
    t.mul_(3)  # in place: the same memory
    again = arrays.of("weight", t)
    assert again is first and again[0] == 3


@pytest.mark.usefixtures("python_path")
def test_the_layer_reuses_its_views_from_call_to_call() -> None:
    ours, ref = _pair()
    _check_same(ours, ref, seed=0)
    views = dict(ours._arrays._views)
    assert set(views) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    with torch.no_grad():  # what an optimizer does: in place
        for layer in (ours, ref):
            layer.weight.add_(0.25)
    _check_same(ours, ref, seed=1)
    assert all(ours._arrays._views[name] is view for name, view in views.items())


def _assign_data(layer: nn.Module) -> None:
    layer.weight.data = layer.weight.data.clone() * 2


def _new_parameter(layer: nn.Module) -> None:
    layer.weight = nn.Parameter(layer.weight.detach() * -1)


def _set_storage(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.running_mean.set_(torch.full((C,), 0.5))


def _new_buffer(layer: nn.Module) -> None:
    layer.running_var = torch.full((C,), 2.0)


def _load_state_dict_assign(layer: nn.Module) -> None:
    state = {k: v.clone() + (1 if v.is_floating_point() else 0) for k, v in layer.state_dict().items()}
    layer.load_state_dict(state, assign=True)


@pytest.mark.parametrize("change", [_assign_data, _new_parameter, _set_storage, _new_buffer, _load_state_dict_assign],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_changed_tensor_gets_a_new_view(change: Callable[[nn.Module], None]) -> None:
    ours, ref = _pair()
    _check_same(ours, ref, seed=0)
    change(ours)
    change(ref)
    _check_same(ours, ref, seed=1)
    _check_same(ours, ref, seed=2)


@pytest.mark.usefixtures("python_path")
def test_a_dtype_conversion_gets_new_views() -> None:
    ours, ref = _pair()
    _check_same(ours, ref, seed=0)
    ours.double()
    ref.double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, C, 4, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert ours._arrays._views["weight"].array.dtype == "float64"


def test_a_resize_in_place_gets_a_new_view() -> None:
    arrays = LayerArrays()
    t = torch.zeros(2 * C)
    assert arrays.of("running_mean", t).shape == (2 * C,)
    t.resize_(C)  # the same memory, fewer values
    assert arrays.of("running_mean", t).shape == (C,)


def test_a_reinterpreted_dtype_gets_a_new_view() -> None:
    arrays = LayerArrays()
    t = torch.zeros(C)
    assert arrays.of("weight", t).dtype == "float32"
    t.data = t.data.view(torch.int32)  # the same memory and size, another dtype
    assert arrays.of("weight", t).dtype == "int32"


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))], ids=["deepcopy", "pickle"])
def test_a_copy_of_the_layer_starts_without_views(copier: Callable[[nn.Module], nn.Module]) -> None:
    ours, ref = _pair()
    _check_same(ours, ref, seed=0)
    twin = copier(ours)
    assert isinstance(twin, syncbn.SyncBatchNorm) and twin._arrays._views == {}
    twin_ref = copy.deepcopy(ref)
    _check_same(twin, twin_ref, seed=1)
    # the copy's state moved, the original's did not
    assert not torch.equal(twin.running_mean, ours.running_mean)
    _check_same(ours, ref, seed=1)


@pytest.mark.usefixtures("python_path")
def test_stale_view_would_be_caught() -> None:
    """Negative control: a layer that kept a view of the old memory after
    ``.data`` was assigned would compute with the old weight; the check above
    sees the difference."""
    ours, ref = _pair()
    _check_same(ours, ref, seed=0)
    stale = ours._arrays._views["weight"]
    _assign_data(ours)
    _assign_data(ref)
    stale.tensor = ours.weight  # pretend the identity check passed
    stale.data_ptr = ours.weight.data_ptr()  # and the pointer check
    with pytest.raises(AssertionError):
        _check_same(ours, ref, seed=1)
