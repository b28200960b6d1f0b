"""Single-process tests of ``syncbn.SyncBatchNorm`` against ``torch.nn.BatchNorm1d/2d/3d``.

With one process the synchronized layer must behave exactly like plain batch
norm: outputs, input and parameter gradients, running statistics and
``num_batches_tracked``, step after step. The multi-process behaviour is in
test_distributed.py. Tests marked ``xfail(strict=True)`` document library bugs;
the reason names the fix, and strict turns the fixed test's pass into a
reminder to remove the marker.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from batchnorm_data import C, LAYOUTS, TOL, PartnerWithoutSamples, batch, set_random_affine
import syncbn
from syncbn.comm import Communicator, LocalCommunicator


# float16 / bfloat16 against a float32 reference
LOOSE_TOL = {
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=8e-2, rtol=5e-2),
}


def _make_pair(
    ref_cls: type[nn.modules.batchnorm._BatchNorm],
    dtype: torch.dtype,
    seed: int = 0,
    process_group: Any = None,
    **kwargs,
) -> tuple[syncbn.SyncBatchNorm, nn.Module]:
    """A SyncBatchNorm and a torch reference with the same random affine parameters."""
    ours = syncbn.SyncBatchNorm(C, dtype=dtype, process_group=process_group, **kwargs)
    ref = ref_cls(C, dtype=dtype, **kwargs)
    set_random_affine(ours, seed + 1000)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _assert_close(actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
                  what: str, tol: dict) -> None:
    if expected is None:
        assert actual is None, f"{what}: expected None (got a tensor)"
        return
    assert actual is not None, f"{what}: expected a tensor (got None)"
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _run_and_compare(
    ours: nn.Module,
    ref: nn.Module,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    memory_format: torch.memory_format = torch.contiguous_format,
    steps: int = 3,
    seed: int = 0,
) -> None:
    """Several forward/backward steps of both layers on the same data; everything must match."""
    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, g = batch(shape, gen, dtype, memory_format)
        xa = x.clone().requires_grad_()
        xb = x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        _assert_close(ya, yb, f"step {step} output", tol)
        assert ya.dtype == x.dtype
        assert ya.is_contiguous(memory_format=memory_format), f"step {step}: output memory format"
        _assert_close(xa.grad, xb.grad, f"step {step} input grad", tol)
        for name in ("weight", "bias"):
            pa, pb = getattr(ours, name), getattr(ref, name)
            _assert_close(None if pa is None else pa.grad, None if pb is None else pb.grad,
                          f"step {step} {name} grad", tol)
        for name in ("running_mean", "running_var"):
            _assert_close(getattr(ours, name), getattr(ref, name), f"step {step} {name}", tol)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    _assert_close(ours.num_batches_tracked, ref.num_batches_tracked, "num_batches_tracked",
                  dict(atol=0, rtol=0))


@pytest.mark.parametrize("momentum", [0.1, 0.3, None], ids=lambda m: f"momentum={m}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("group", ["alone", "synchronized"])
def test_matches_torch_batchnorm(layout: str, dtype: torch.dtype,
                                 momentum: Optional[float], group: str) -> None:
    # alone: a group of one (its own kernels, no collective); synchronized:
    # the path of several ranks, the other rank holding no samples
    comm = LocalCommunicator() if group == "alone" else PartnerWithoutSamples()
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _make_pair(ref_cls, dtype, momentum=momentum, process_group=comm)
    _run_and_compare(ours, ref, shape, dtype, fmt, steps=4)
    assert int(ours.num_batches_tracked) == 4
    # one collective per pass, none when there is no one to wait for
    assert ours.communicator.calls == (0 if group == "alone" else 2 * 4)


@pytest.mark.parametrize("make", [
    lambda t: t[:, :, ::2],                      # strided slice
    lambda t: t.permute(0, 1, 3, 2),             # H and W swapped in memory
    lambda t: t[:, :, :1, :1].contiguous(),      # (N, C, 1, 1): both layouts at once
    lambda t: t[:, :, 0, :].transpose(0, 2),     # (W, C, N) view, 3-D, no contiguous axis order
    lambda t: t[:, :, 0, 0].t().contiguous().t(),  # 2-D, column-major
], ids=["strided", "permuted", "spatial_1x1", "transposed_3d", "column_major_2d"])
def test_non_contiguous_inputs(make) -> None:
    gen = torch.Generator().manual_seed(0)
    x, _ = batch((4, C, 6, 8), gen, torch.float64)
    x = make(x)
    ours, ref = _make_pair(LAYOUTS[{2: "2d", 3: "3d", 4: "4d"}[x.dim()]][1], torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    (ours(xa) * g).sum().backward()
    (ref(xb) * g).sum().backward()
    torch.testing.assert_close(ours(x.clone()), ref(x.clone()), **TOL[torch.float64])
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[torch.float64])
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL[torch.float64])


def test_same_byte_strides_in_another_dtype() -> None:
    # A float64 (N, C) contiguous input and a float32 view of every other
    # column of a (N, 2C) tensor have the same strides in bytes: the layout
    # chosen for the first (viewed in place) must not be reused for the second.
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 2 * C, generator=gen)
    for x in (wide.double()[:, :C].contiguous(), wide[:, ::2]):
        assert x.shape == (6, C)
        ours, ref = _make_pair(nn.BatchNorm1d, x.dtype)
        torch.testing.assert_close(ours(x), ref(x), **TOL[x.dtype])
    assert wide[:, ::2].stride() == (2 * C, 2) and wide[:, ::2].element_size() == 4


class _Doubled(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return 2 * w


def test_parametrized_weight_is_used() -> None:
    # a parametrization takes "weight" out of _parameters: the layer must still
    # see the parametrized value (and train the original through it)
    from torch.nn.utils import parametrize

    ours, ref = _make_pair(nn.BatchNorm2d, torch.float64)
    parametrize.register_parametrization(ours, "weight", _Doubled())
    assert "weight" not in ours._parameters
    with torch.no_grad():
        ref.weight.mul_(2)
    x, g = batch((4, C, 3, 3), torch.Generator().manual_seed(0), torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, **TOL[torch.float64])
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
    original = ours.parametrizations.weight.original
    torch.testing.assert_close(original.grad, 2 * ref.weight.grad, **TOL[torch.float64])
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x), **TOL[torch.float64])


def test_expanded_output_gradient() -> None:
    # an output gradient with stride 0 (from expand) and a channels-last input
    ours, ref = _make_pair(nn.BatchNorm2d, torch.float64)
    x, g = batch((4, C, 3, 3), torch.Generator().manual_seed(0), torch.float64,
                  torch.channels_last)
    g = g[..., :1].expand(x.shape)
    assert 0 in g.stride()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).backward(g)
    ref(xb).backward(g)
    assert xb.grad.abs().max() > 1e-3          # not a trivially zero gradient
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[torch.float64])
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[torch.float64])
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL[torch.float64])


def test_nan_batch_does_not_poison_later_batches() -> None:
    ours, ref = _make_pair(nn.BatchNorm1d, torch.float64, track_running_stats=False)
    x = torch.randn(4, C, 5, dtype=torch.float64)
    x[0, 1, 0] = float("nan")
    assert ours(x)[:, 1].isnan().all() and not ours(x)[:, 0].isnan().any()
    _run_and_compare(ours, ref, (4, C, 5), torch.float64)


def test_double_backward_is_refused_not_silently_dropped() -> None:
    # torch's batch norm supports double backward (e.g. gradient penalties).
    # Ours need not, but then it must say so: an input gradient built with
    # create_graph=True that silently carries no graph drops the
    # second-order terms of any loss that also has other paths.
    layer = syncbn.SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(4, C, 5, dtype=torch.float64, requires_grad=True)
    gx, = torch.autograd.grad(layer(x).pow(3).sum(), x, create_graph=True)
    assert gx.requires_grad, "create_graph=True gave an input gradient without a graph"
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (gx.square().sum() + x.sum()).backward()


def test_comparison_can_fail() -> None:
    # Negative control for the harness above: a reference with another
    # momentum gives other running statistics, and the comparison says so.
    shape, ref_cls, fmt = LAYOUTS["4d"]
    ours = syncbn.SyncBatchNorm(C, momentum=0.1, dtype=torch.float64)
    ref = ref_cls(C, momentum=0.3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="running_mean"):
        _run_and_compare(ours, ref, shape, torch.float64, fmt)


@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last_3d"])
def test_affine_false(layout: str) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _make_pair(ref_cls, torch.float64, affine=False)
    assert ours.weight is None and ours.bias is None
    _run_and_compare(ours, ref, shape, torch.float64, fmt)


@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last"])
def test_track_running_stats_false_uses_batch_stats_in_eval_too(layout: str) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _make_pair(ref_cls, torch.float64, track_running_stats=False,
                           process_group=PartnerWithoutSamples())
    assert ours.running_mean is None and ours.running_var is None
    assert ours.num_batches_tracked is None
    _run_and_compare(ours, ref, shape, torch.float64, fmt)
    ours.eval()
    ref.eval()
    calls = ours.communicator.calls
    _run_and_compare(ours, ref, shape, torch.float64, fmt, seed=1)
    # batch statistics in eval are local: nothing goes through the layer's group
    assert ours.communicator.calls == calls
    # and they really are batch statistics (torch's rule, stated directly)
    x, _ = batch(shape, torch.Generator().manual_seed(2), torch.float64, fmt)
    expected = nn.functional.batch_norm(x, None, None, ours.weight, ours.bias, True, 0.0, ours.eps)
    torch.testing.assert_close(ours(x), expected, **TOL[torch.float64])


def test_track_running_stats_toggled_off_after_construction() -> None:
    shape, ref_cls, fmt = LAYOUTS["4d"]
    ours, ref = _make_pair(ref_cls, torch.float64)
    _run_and_compare(ours, ref, shape, torch.float64, fmt, steps=2)
    mean, var = ours.running_mean.clone(), ours.running_var.clone()
    ours.track_running_stats = False
    ref.track_running_stats = False
    # training: batch statistics, buffers frozen (torch's rule)
    _run_and_compare(ours, ref, shape, torch.float64, fmt, steps=2, seed=1)
    assert torch.equal(ours.running_mean, mean) and torch.equal(ours.running_var, var)
    assert int(ours.num_batches_tracked) == 2
    # eval: the buffers still exist, so torch uses them; so must we
    ours.eval()
    ref.eval()
    _run_and_compare(ours, ref, shape, torch.float64, fmt, steps=1, seed=2)


@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last", "5d"])
def test_eval_uses_running_stats_without_allreduce(layout: str) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _make_pair(ref_cls, torch.float64, process_group=PartnerWithoutSamples())
    _run_and_compare(ours, ref, shape, torch.float64, fmt, steps=3)
    calls = ours.communicator.calls
    assert calls == 6
    ours.eval()
    ref.eval()
    _run_and_compare(ours, ref, shape, torch.float64, fmt, steps=2, seed=7)
    with torch.no_grad():
        ours(torch.randn(shape, dtype=torch.float64))
    assert ours.communicator.calls == calls, "eval must not communicate"
    assert int(ours.num_batches_tracked) == 3
    # negative control: eval output is not the batch-statistics output
    x, _ = batch(shape, torch.Generator().manual_seed(3), torch.float64, fmt)
    y_eval = ours(x)
    ours.train()
    assert (ours(x) - y_eval).abs().max() > 1e-3


def test_default_communicator_is_local(no_launcher: None) -> None:
    layer = syncbn.SyncBatchNorm(C)
    assert isinstance(layer.communicator, LocalCommunicator)
    assert layer.communicator.calls == 0
    assert isinstance(syncbn.SyncBatchNorm(C, process_group="local").communicator,
                      LocalCommunicator)
    comm = LocalCommunicator()
    assert syncbn.SyncBatchNorm(C, process_group=comm).communicator is comm


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_no_grad_forward_allreduces_once_and_saves_nothing(x_requires_grad: bool) -> None:
    shape, ref_cls, _ = LAYOUTS["4d"]
    ours, ref = _make_pair(ref_cls, torch.float32, process_group=PartnerWithoutSamples())
    x, _ = batch(shape, torch.Generator().manual_seed(0), torch.float32)
    x.requires_grad_(x_requires_grad)
    with torch.no_grad():
        y = ours(x)
        y_ref = ref(x)
    assert y.grad_fn is None and not y.requires_grad
    assert ours.communicator.calls == 1
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **TOL[torch.float32])
    torch.testing.assert_close(ours.running_var, ref.running_var, **TOL[torch.float32])
    assert int(ours.num_batches_tracked) == 1


def test_nothing_requires_grad_saves_nothing() -> None:
    ours = syncbn.SyncBatchNorm(C, affine=False, process_group=PartnerWithoutSamples())
    y = ours(torch.randn(4, C, 5))
    assert y.grad_fn is None
    assert ours.communicator.calls == 1


def test_backward_allreduces_only_when_input_needs_grad() -> None:
    shape, ref_cls, _ = LAYOUTS["4d"]
    ours, ref = _make_pair(ref_cls, torch.float64, process_group=PartnerWithoutSamples())
    x, g = batch(shape, torch.Generator().manual_seed(0), torch.float64)
    (ours(x) * g).sum().backward()   # only weight and bias need grads
    (ref(x) * g).sum().backward()
    assert ours.communicator.calls == 1
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, **TOL[torch.float64])
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, **TOL[torch.float64])


@pytest.mark.parametrize("layout", ["3d", "4d", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_against_float32_reference(dtype: torch.dtype, layout: str) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, _ = _make_pair(ref_cls, dtype)
    ref = ref_cls(C)
    ref.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in ours.state_dict().items()})
    tol = LOOSE_TOL[dtype]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        x, g = batch(shape, gen, dtype, fmt)
        xa = x.clone().requires_grad_()
        xb = x.float().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        (ya * g).sum().backward()
        (yb * g.float()).sum().backward()
        assert ya.dtype == dtype and xa.grad.dtype == dtype
        assert ya.is_contiguous(memory_format=fmt)
        for p in (ours.weight, ours.bias, ours.running_mean, ours.running_var):
            assert p.dtype == dtype
        assert ours.weight.grad.dtype == dtype and ours.bias.grad.dtype == dtype
        _assert_close(ya.float(), yb, f"step {step} output", tol)
        # input grads are differences of O(1) terms: compare relative to their scale
        scale = xb.grad.abs().max()
        _assert_close(xa.grad.float() / scale, xb.grad / scale, f"step {step} input grad", tol)
        for name in ("weight", "bias"):
            ga, gb = getattr(ours, name).grad.float(), getattr(ref, name).grad
            _assert_close(ga / gb.abs().max(), gb / gb.abs().max(), f"step {step} {name} grad", tol)
        for name in ("running_mean", "running_var"):
            _assert_close(getattr(ours, name).float(), getattr(ref, name), name, tol)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_input_with_float32_params(dtype: torch.dtype) -> None:
    # torch's CPU batch norm takes this mix too: output in the input's dtype,
    # parameter grads and running stats in float32
    ours, ref = _make_pair(nn.BatchNorm2d, torch.float32)
    x, g = batch((4, C, 3, 3), torch.Generator().manual_seed(0), dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    assert ya.dtype == yb.dtype == dtype and xa.grad.dtype == dtype
    assert ours.weight.grad.dtype == torch.float32 and ours.running_mean.dtype == torch.float32
    tol = LOOSE_TOL[dtype]
    _assert_close(ya.float(), yb.float(), "output", tol)
    scale = xb.grad.float().abs().max()
    _assert_close(xa.grad.float() / scale, xb.grad.float() / scale, "input grad", tol)
    for name in ("weight", "bias"):
        ga, gb = getattr(ours, name).grad, getattr(ref, name).grad
        _assert_close(ga / gb.abs().max(), gb / gb.abs().max(), f"{name} grad", tol)
    _assert_close(ours.running_var, ref.running_var, "running_var", tol)


def test_batch_of_one_with_spatial_extent_is_valid() -> None:
    ours, ref = _make_pair(nn.BatchNorm1d, torch.float64)
    _run_and_compare(ours, ref, (1, C, 5), torch.float64)
    ours, ref = _make_pair(nn.BatchNorm2d, torch.float64)
    _run_and_compare(ours, ref, (1, C, 1, 2), torch.float64)


@pytest.mark.parametrize("shape", [(1, C), (1, C, 1), (1, C, 1, 1), (1, C, 1, 1, 1)],
                         ids=lambda s: f"{len(s)}d")
def test_one_value_per_channel_raises(shape: tuple[int, ...]) -> None:
    layer = syncbn.SyncBatchNorm(C)
    before = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(shape, requires_grad=True))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a failed forward"
    # the layer is still usable afterwards
    ours, ref = _make_pair(nn.BatchNorm2d, torch.float64)
    with pytest.raises(ValueError):
        ours(torch.randn(shape, dtype=torch.float64))
    _run_and_compare(ours, ref, (2, C, 2, 2), torch.float64)
    # one value per channel is fine in eval (running statistics)
    layer.eval()
    assert layer(torch.randn(shape)).shape == shape


@pytest.mark.parametrize("layout", ["2d", "4d", "channels_last", "5d"])
def test_empty_batch(layout: str) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    ours, ref = _make_pair(ref_cls, torch.float32, momentum=None)
    _run_and_compare(ours, ref, shape, torch.float32, fmt, steps=1)
    state = copy.deepcopy(ours.state_dict())
    x = torch.randn((0,) + shape[1:]).contiguous(memory_format=fmt).requires_grad_()
    y = ours(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * 2).sum().backward()
    assert x.grad.shape == x.shape
    assert torch.isfinite(ours.weight.grad).all() and torch.isfinite(ours.bias.grad).all()
    assert not ours.weight.grad.any() and not ours.bias.grad.any()
    for k, v in ours.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed by an empty batch"
    ours.zero_grad(set_to_none=True)
    # the layer goes on exactly as if the empty batch had not been seen
    # (momentum=None: the cumulative average counts only real batches)
    _run_and_compare(ours, ref, shape, torch.float32, fmt, steps=2, seed=5)
    assert int(ours.num_batches_tracked) == 3
    with torch.no_grad():
        assert ours(x).shape == x.shape


@pytest.mark.parametrize("layout", ["channels_last", "channels_last_3d"])
def test_empty_batch_keeps_memory_format(layout: str) -> None:
    shape, ref_cls, fmt = LAYOUTS[layout]
    x = torch.randn((0,) + shape[1:]).contiguous(memory_format=fmt)
    expected = ref_cls(C)(x)
    assert expected.stride() == x.stride()          # torch keeps the input's strides
    y = syncbn.SyncBatchNorm(C)(x)
    assert y.stride() == x.stride(), f"strides {y.stride()} (input {x.stride()})"


def test_bad_inputs_raise_with_expected_and_got() -> None:
    layer = syncbn.SyncBatchNorm(C)
    with pytest.raises(ValueError, match=r"(?s)expected.*2 dimensions.*got 1D"):
        layer(torch.randn(C))
    with pytest.raises(ValueError, match=r"(?s)expected.*3 channels.*got 2"):
        layer(torch.randn(4, 2, 5))
    with pytest.raises(TypeError, match=r"(?s)expected.*floating.*got torch\.int64"):
        layer(torch.ones(4, C, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"(?s)expected.*2 dimensions.*got 0D"):
        layer(torch.tensor(1.0))
    # rejected before any collective or state change
    assert layer.communicator.calls == 0
    assert int(layer.num_batches_tracked) == 0
    # eval checks the input too
    layer.eval()
    with pytest.raises(ValueError, match=r"(?s)expected.*3 channels.*got 4"):
        layer(torch.randn(4, 4, 5))


@pytest.mark.parametrize("other_cls", [nn.BatchNorm2d, nn.SyncBatchNorm])
def test_state_dict_compatible_both_ways(other_cls: type[nn.Module]) -> None:
    ours, _ = _make_pair(nn.BatchNorm2d, torch.float64)
    ours(torch.randn(4, C, 3, 3, dtype=torch.float64))
    other = other_cls(C, dtype=torch.float64)
    assert list(ours.state_dict()) == list(other.state_dict())
    # ours -> torch
    other.load_state_dict(ours.state_dict())
    for k, v in ours.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
    # torch -> ours
    with torch.no_grad():
        other.weight.mul_(2)
        other.running_mean.add_(1)
        other.num_batches_tracked.add_(5)
    fresh = syncbn.SyncBatchNorm(C, dtype=torch.float64)
    fresh.load_state_dict(other.state_dict())
    for k, v in other.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(4, C, 3, 3, dtype=torch.float64)
    other_eval = nn.BatchNorm2d(C, dtype=torch.float64)
    other_eval.load_state_dict(other.state_dict())
    torch.testing.assert_close(fresh.eval()(x), other_eval.eval()(x), **TOL[torch.float64])


def test_copy_and_pickle_after_use() -> None:
    import pickle

    layer = syncbn.SyncBatchNorm(C)
    layer(torch.randn(4, C, 2))
    assert layer._comm is not None     # resolved: a live communicator object
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.communicator is not layer.communicator
        assert clone.communicator.calls == 0
        for k, v in layer.state_dict().items():
            assert torch.equal(clone.state_dict()[k], v), k


def test_not_a_torch_syncbatchnorm() -> None:
    # DDP refuses torch.nn.SyncBatchNorm on CPU; ours must not look like one
    assert not isinstance(syncbn.SyncBatchNorm(C), nn.SyncBatchNorm)
    assert isinstance(syncbn.SyncBatchNorm(C), nn.modules.batchnorm._BatchNorm)


@pytest.mark.parametrize("layout", ["2d", "3d", "channels_last"])
def test_gradcheck(layout: str) -> None:
    shape, _, fmt = LAYOUTS[layout]
    shape = (shape[0],) + shape[1:3] + tuple(min(s, 2) for s in shape[3:])
    layer = syncbn.SyncBatchNorm(C, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x, _ = batch(shape, gen, torch.float64, fmt)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()

    def f(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return functional_call(layer, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w, b))


def test_gradcheck_without_affine() -> None:
    layer = syncbn.SyncBatchNorm(C, affine=False, dtype=torch.float64)
    x, _ = batch((3, C, 4), torch.Generator().manual_seed(0), torch.float64)
    assert torch.autograd.gradcheck(layer, (x.requires_grad_(),))


def test_communicator_interface_is_used() -> None:
    # a user-supplied Communicator is used as is, one allreduce per pass
    # (two ranks: with one there is nothing to reduce and no collective)
    class Recording(Communicator):
        rank, size = 0, 2

        def __init__(self) -> None:
            super().__init__()
            self.sizes: list[int] = []

        def _allreduce(self, buf: torch.Tensor) -> None:
            self.sizes.append(buf.numel())

    comm = Recording()
    layer = syncbn.SyncBatchNorm(C, process_group=comm)
    x = torch.randn(4, C, 5, requires_grad=True)
    layer(x).sum().backward()
    assert comm.sizes == [2 * C + 1, 2 * C]


@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_functorch_transforms_are_refused_clearly(transform: str) -> None:
    """Training calls go straight to autograd's C++ apply, except under a
    functorch transform, where Function.apply's own error must still come
    (rather than a batched or differentiated call computed wrongly)."""
    layer = syncbn.SyncBatchNorm(C, process_group="local")
    x = torch.randn(2, 4, C, 5)
    with pytest.raises(RuntimeError, match="functorch transforms"):
        if transform == "vmap":
            torch.func.vmap(layer)(x)
        else:
            torch.func.grad(lambda t: layer(t).sum())(x[0])


@pytest.mark.usefixtures("python_path")
def test_training_call_records_the_backward_node() -> None:
    for layer, name in ((syncbn.SyncBatchNorm(C, process_group="local"), "SyncBatchNormFunctionBackward"),
                        (syncbn.SyncBatchNorm(C, process_group="local", activation="relu"),
                         "SyncBatchNormActFunctionBackward")):
        y = layer(torch.randn(4, C, 5, requires_grad=True))
        assert type(y.grad_fn).__name__ == name
