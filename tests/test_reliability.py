"""Reliability: non-finite input, huge counts, cancellation, degenerate batches,
errors before collectives.

Ranks are simulated with threads (tests/simulated.py). Debug mode, and a
failing rank under real launchers, are in test_debug.py.

Tests marked ``xfail(strict=True)`` document library bugs found here; the
fix is described in the reason. Once it is applied they pass, and strict
turns that into a failure, as a reminder to remove the marker.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
import torch

from simulated import RankGone, SimulatedCommunicator, run_ranks
from syncbn import SyncBatchNorm

NAN, INF = float("nan"), float("inf")


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str,
                          atol: float = 1e-5) -> None:
    """Equal NaN and ±Inf patterns, and close finite values."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert torch.equal(actual.isnan(), expected.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(actual.isposinf(), expected.isposinf()), f"{what}: +Inf pattern differs"
    assert torch.equal(actual.isneginf(), expected.isneginf()), f"{what}: -Inf pattern differs"
    finite = expected.isfinite()
    torch.testing.assert_close(actual[finite], expected[finite], rtol=atol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def shards(x: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    return [x[a:b].clone() for a, b in zip(cuts[:-1], cuts[1:])]


# --- NaN and Inf ----------------------------------------------------------------

def nonfinite_batch(dtype: torch.dtype) -> torch.Tensor:
    """(6, 5, 3, 3): NaN in channel 0, +Inf in 1, -Inf in 2, +Inf and -Inf in 3, 4 clean.

    No non-finite value is the first value of its channel on any shard of
    ``CUTS`` (see test_inf_first_value_of_a_channel for that case).
    """
    x = torch.randn(6, 5, 3, 3, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x[2, 0, 1, 1] = NAN
    x[5, 1, 2, 0] = INF
    x[3, 2, 0, 2] = -INF
    x[1, 3, 1, 0], x[4, 3, 2, 2] = INF, -INF
    return x


CUTS = [0, 2, 2, 6]   # three ranks, one of them empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_nonfinite_like_torch_one_process(dtype: torch.dtype, fmt: torch.memory_format) -> None:
    x = nonfinite_batch(dtype).contiguous(memory_format=fmt)
    dy = torch.randn(x.shape, dtype=dtype)
    ours = SyncBatchNorm(5, dtype=dtype)
    ref = torch.nn.BatchNorm2d(5, dtype=dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    ya.backward(dy)
    yb.backward(dy)
    assert_same_nonfinite(ya, yb, "output")
    assert_same_nonfinite(xa.grad, xb.grad, "input grad")
    assert_same_nonfinite(ours.weight.grad, ref.weight.grad, "weight grad", atol=1e-4)
    assert_same_nonfinite(ours.bias.grad, ref.bias.grad, "bias grad", atol=1e-4)
    assert_same_nonfinite(ours.running_mean, ref.running_mean, "running_mean")
    assert_same_nonfinite(ours.running_var, ref.running_var, "running_var")
    # only the channels that held a non-finite value are affected
    assert ya[:, 4].isfinite().all() and xa.grad[:, 4].isfinite().all()
    assert ours.running_mean[4].isfinite() and ours.running_var[4].isfinite()

    # the layer keeps working: a clean batch normalizes correctly, and the
    # running statistics of the clean channel stay right
    clean = torch.randn(x.shape, dtype=dtype).contiguous(memory_format=fmt) * 3 + 2
    ya, yb = ours(clean), ref(clean)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    assert ya.isfinite().all()
    torch.testing.assert_close(ours.running_mean[4], ref.running_mean[4])
    torch.testing.assert_close(ours.running_var[4], ref.running_var[4])
    assert not ours.running_mean[:4].isfinite().any()   # (±Inf or NaN: see below)


def test_inf_running_mean_stays_inf_like_torch() -> None:
    x = torch.randn(6, 2, 3)
    x[2, 0, 1] = INF
    ours, ref = SyncBatchNorm(2), torch.nn.BatchNorm1d(2)
    ours(x), ref(x)
    assert_same_nonfinite(ours.running_mean, ref.running_mean, "running_mean")
    clean = torch.randn(6, 2, 3)
    ours(clean), ref(clean)
    assert_same_nonfinite(ours.running_mean, ref.running_mean, "running_mean after")


def test_nonfinite_like_torch_across_ranks() -> None:
    """Non-finite values on one rank reach every rank's statistics, as in the global batch."""
    x = nonfinite_batch(torch.float32)
    dy = torch.randn(x.shape)
    clean = torch.randn(x.shape) * 3 + 2
    ref = torch.nn.BatchNorm2d(5)
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(dy)
    stats_ref = (ref.running_mean.clone(), ref.running_var.clone())
    y_clean_ref = ref(clean)

    def fn(rank: int, comm: SimulatedCommunicator) -> dict[str, Any]:
        bn = SyncBatchNorm(5, process_group=comm)
        xs = shards(x, CUTS)[rank].requires_grad_()
        y = bn(xs)
        y.backward(shards(dy, CUTS)[rank])
        out = {"y": y.detach(), "dx": xs.grad, "rm": bn.running_mean.clone(),
               "rv": bn.running_var.clone()}
        out["y_clean"] = bn(shards(clean, CUTS)[rank]).detach()
        out["rm_clean"] = bn.running_mean.clone()
        return out

    res = run_ranks(3, fn)
    assert_same_nonfinite(torch.cat([r["y"] for r in res]), y_ref, "output")
    assert_same_nonfinite(torch.cat([r["dx"] for r in res]), xr.grad, "input grad")
    for r in res:
        assert_same_nonfinite(r["rm"], stats_ref[0], "running_mean")
        assert_same_nonfinite(r["rv"], stats_ref[1], "running_var")
        torch.testing.assert_close(r["rm_clean"][4], ref.running_mean[4])
    torch.testing.assert_close(torch.cat([r["y_clean"] for r in res]), y_clean_ref,
                               rtol=1e-5, atol=1e-5)


def test_inf_first_value_of_a_channel() -> None:
    """The kernel's local pivot (a channel's first value) must not be ±Inf: every
    x - pivot would be NaN or ∓Inf and the mean NaN where torch gives ±Inf."""
    x = torch.randn(4, 2, 3)
    x[0, 0, 0] = -INF    # the first value of channel 0: the kernel's pivot
    ours, ref = SyncBatchNorm(2), torch.nn.BatchNorm1d(2)
    assert_same_nonfinite(ours(x), ref(x), "output")
    assert_same_nonfinite(ours.running_mean, ref.running_mean, "running_mean")


def test_clean_batch_after_a_huge_finite_outlier() -> None:
    ours, ref = SyncBatchNorm(2), torch.nn.BatchNorm1d(2)
    x = torch.randn(64, 2)
    x[5, 1] = 1e30
    ours(x), ref(x)
    clean = torch.randn(64, 2)
    torch.testing.assert_close(ours(clean), ref(clean), rtol=1e-4, atol=1e-4)


# --- counts above 2^24 -------------------------------------------------------------

def exact_batch(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """float32 multiples of 1/64 in [0, 16): every float64 sum of them is exact."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1024, shape, generator=gen, dtype=torch.int16).float().div_(64)


def exact_mean_var(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel float64 mean (exact: exact sum, one rounding) and two-pass unbiased var."""
    C = parts[0].shape[1]
    mean, var = torch.empty(C, dtype=torch.float64), torch.empty(C, dtype=torch.float64)
    for c in range(C):
        v = torch.cat([p[:, c].reshape(-1) for p in parts]).double()
        mean[c] = v.sum() / v.numel()
        var[c] = (v - mean[c]).square_().sum() / (v.numel() - 1)
    return mean, var


def test_count_above_2_24_one_process() -> None:
    x = exact_batch((1, 2, 5000, 5000), seed=1)   # 25e6 values per channel
    mean, var = exact_mean_var([x])
    bn = SyncBatchNorm(2, momentum=1.0, dtype=torch.float64)
    with torch.no_grad():
        y = bn(x)
    assert torch.equal(bn.running_mean, mean)     # first call: shift 0, exact
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=0)
    del y
    x.add_(0.5)                                    # later call: shift = previous mean
    with torch.no_grad():
        bn(x)
    torch.testing.assert_close(bn.running_mean, mean + 0.5, rtol=1e-15, atol=0)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=0)


def test_count_above_2_24_two_ranks_channels_last() -> None:
    parts = [exact_batch((1, 2, 5000, 5000), seed=2 + r).contiguous(
        memory_format=torch.channels_last) for r in range(2)]
    mean, var = exact_mean_var(parts)

    def fn(rank: int, comm: SimulatedCommunicator) -> tuple[torch.Tensor, torch.Tensor]:
        bn = SyncBatchNorm(2, momentum=1.0, dtype=torch.float64, process_group=comm)
        with torch.no_grad():
            y = bn(parts[rank])
        assert y.is_contiguous(memory_format=torch.channels_last)
        return bn.running_mean, bn.running_var

    for rm, rv in run_ranks(2, fn):
        assert torch.equal(rm, mean)
        torch.testing.assert_close(rv, var, rtol=1e-12, atol=0)


# --- cancellation: |mean| / std = 1e6 -------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_large_mean_over_std_across_ranks(layout: str) -> None:
    """float32, |mean|/std = 1e6, 3 ranks with different local means: variance within 1e-3."""
    gen = torch.Generator().manual_seed(3)
    centers = [1e6, 1e6 + 3.0, -1e6, -1e6 + 0.5]   # call 1 starts at shift 0; call 3 jumps
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    steps = []
    for center in centers:
        parts = [(center + r + torch.randn(4, 3, 5, 5, generator=gen, dtype=torch.float64))
                 .float().contiguous(memory_format=fmt) for r in range(3)]
        steps.append(parts)

    def fn(rank: int, comm: SimulatedCommunicator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        bn = SyncBatchNorm(3, momentum=1.0, dtype=torch.float64, process_group=comm)
        out = []
        for parts in steps:
            with torch.no_grad():
                y = bn(parts[rank])
            out.append((bn.running_var.clone(), y))
        return out

    res = run_ranks(3, fn)
    for t, parts in enumerate(steps):
        _, var = exact_mean_var(parts)
        for rank in range(3):
            rv, _ = res[rank][t]
            torch.testing.assert_close(rv, var, rtol=1e-3, atol=0,
                                       msg=lambda m: f"call {t}, rank {rank}: {m}")
        y = torch.cat([res[r][t][1] for r in range(3)]).double()
        dims = (0, 2, 3)
        assert y.mean(dims).abs().max() < 1e-3, (t, y.mean(dims))
        torch.testing.assert_close(y.var(dims, unbiased=False), torch.ones(3, dtype=torch.float64),
                                   rtol=1e-3, atol=0)


def test_float64_mean_over_std_1e9_first_call() -> None:
    x = 1e9 + torch.randn(64, 3, dtype=torch.float64)
    bn = SyncBatchNorm(3, momentum=1.0, dtype=torch.float64)
    bn(x)
    torch.testing.assert_close(bn.running_var, x.var(0), rtol=1e-6, atol=0)


# --- degenerate global batches ---------------------------------------------------------

@pytest.mark.parametrize("shape_tail", [(3,), (3, 1, 1)])
def test_global_count_one_same_error_on_every_rank(shape_tail: tuple[int, ...]) -> None:
    x = torch.randn(1, *shape_tail)

    def fn(rank: int, comm: SimulatedCommunicator) -> dict[str, Any]:
        bn = SyncBatchNorm(3, process_group=comm)
        before = [t.clone() for t in bn.buffers()] + [torch.from_numpy(bn._shift.copy())]
        xs = x if rank == 1 else x[:0]
        try:
            bn(xs.clone().requires_grad_())
        except ValueError as exc:
            error: Optional[ValueError] = exc
        else:
            error = None
        after = [t.clone() for t in bn.buffers()] + [torch.from_numpy(bn._shift.copy())]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after))
        calls = comm.calls
        # the layer keeps working afterwards
        y = bn(torch.randn(2, *shape_tail) + rank)
        return {"error": error, "unchanged": unchanged, "calls": calls, "y": y}

    res = run_ranks(3, fn)
    for r in res:
        assert isinstance(r["error"], ValueError)
        assert "Expected more than 1 value per channel when training" in str(r["error"])
        assert r["unchanged"] and r["calls"] == 1   # raised after the one collective
        assert r["y"].isfinite().all()


def test_global_count_zero() -> None:
    def fn(rank: int, comm: SimulatedCommunicator) -> dict[str, Any]:
        bn = SyncBatchNorm(3, momentum=None, process_group=comm)
        bn(torch.randn(4, 3, 2, 2))                   # some state to keep
        before = [t.clone() for t in bn.buffers()]
        xs = torch.empty(0, 3, 2, 2, requires_grad=True)
        c0 = comm.calls
        y = bn(xs)
        c1 = comm.calls
        y.sum().backward()
        return {"y": y, "dx": xs.grad, "dw": bn.weight.grad, "db": bn.bias.grad,
                "calls": (c1 - c0, comm.calls - c1),
                "unchanged": all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))}

    for r in run_ranks(3, fn):
        assert r["y"].shape == (0, 3, 2, 2) and r["dx"].shape == (0, 3, 2, 2)
        assert r["unchanged"]                          # num_batches_tracked included
        assert torch.equal(r["dw"], torch.zeros(3)) and torch.equal(r["db"], torch.zeros(3))
        assert r["calls"] == (1, 0)


def test_rank_without_samples_joins_every_collective() -> None:
    x = torch.randn(7, 3, 4) * 2 + 1
    dy = torch.randn(x.shape)
    cuts = [0, 3, 3, 7]
    ref = torch.nn.BatchNorm1d(3)
    xr = x.clone().requires_grad_()
    ref(xr).backward(dy)

    def fn(rank: int, comm: SimulatedCommunicator) -> dict[str, Any]:
        bn = SyncBatchNorm(3, process_group=comm)
        xs = shards(x, cuts)[rank].requires_grad_()
        bn(xs).backward(shards(dy, cuts)[rank])
        return {"dx": xs.grad, "calls": comm.calls, "rv": bn.running_var, "dw": bn.weight.grad}

    res = run_ranks(3, fn)
    assert [r["calls"] for r in res] == [2, 2, 2]
    assert res[1]["dx"].shape == (0, 3, 4) and torch.equal(res[1]["dw"], torch.zeros(3))
    torch.testing.assert_close(torch.cat([r["dx"] for r in res]), xr.grad)
    for r in res:
        torch.testing.assert_close(r["rv"], ref.running_var)


# --- errors before any collective --------------------------------------------------------

BAD_INPUTS: dict[str, tuple[Callable[[], torch.Tensor], type]] = {
    "1-D": (lambda: torch.randn(4), ValueError),
    "0-D": (lambda: torch.tensor(1.0), ValueError),
    "wrong channels": (lambda: torch.randn(4, 5, 2), ValueError),
    "integer": (lambda: torch.ones(4, 3, 2, dtype=torch.int64), TypeError),
    "bool": (lambda: torch.ones(4, 3, dtype=torch.bool), TypeError),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
@pytest.mark.parametrize("training", [True, False])
def test_validation_errors_come_before_any_collective(name: str, training: bool) -> None:
    make, error = BAD_INPUTS[name]

    def fn(rank: int, comm: SimulatedCommunicator) -> Any:
        bn = SyncBatchNorm(3, process_group=comm).train(training)
        with pytest.raises(error, match="SyncBatchNorm: expected"):
            bn(make())
        return comm.calls, [t.clone() for t in bn.buffers()]

    for calls, buffers in run_ranks(2, fn):
        assert calls == 0
        fresh = list(SyncBatchNorm(3).buffers())
        assert all(torch.equal(a, b) for a, b in zip(buffers, fresh))


def test_bad_input_on_one_rank_without_debug_leaves_the_others_waiting() -> None:
    """The documented limit without debug mode: only the bad rank raises (a real job hangs)."""
    def fn(rank: int, comm: SimulatedCommunicator) -> None:
        bn = SyncBatchNorm(3, process_group=comm)
        bn(torch.randn(4, 5 if rank == 1 else 3))

    res = run_ranks(3, fn, return_exceptions=True, timeout=30)
    assert isinstance(res[1], ValueError)
    assert isinstance(res[0], RankGone) and isinstance(res[2], RankGone)
