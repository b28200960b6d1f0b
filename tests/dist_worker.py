"""Multi-process worker of tests/test_distributed.py (4 ranks).

    mpiexec -n 4 --oversubscribe python -m mpi4py tests/dist_worker.py mpi
    torchrun --standalone --nproc_per_node 4 tests/dist_worker.py torch

Every rank builds the same global batch from one seed, takes its shard, and
compares the synchronized layer with plain ``torch.nn.BatchNorm`` run on the
whole batch in this one process (ChainerMN's multi-node BN test). Each case
prints one line per rank::

    rank 2 case uneven_5d_f64 ok max_err=3.1e-16 neg_diff=0.41

or ``... FAIL <what failed>``. Comparisons never raise in the middle of a case:
failures are collected and reported once the case's collectives are all done,
so one rank's failed check cannot leave the others waiting in a collective.
An exception from the library does raise (``python -m mpi4py`` then aborts
the job; torchrun stops the other workers). The exit code is 1 if any case
failed on this rank.
"""
from __future__ import annotations

import copy
import datetime
import os
import sys
import zlib
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from batchnorm_data import apply_activation, batch, set_random_affine
from rank_output import leave, say
import syncbn
from syncbn import _cpp_node_loader, function
from syncbn.comm import MPICommunicator, SharedMemoryCommunicator, TorchCommunicator

WORLD = 4
C = 3
NODE_NAME = "torch::autograd::CppNode<syncbn::BatchNormNode>"

# name: (sample shape without N, memory format)
LAYOUTS: dict[str, tuple[tuple[int, ...], torch.memory_format]] = {
    "2d": ((C,), torch.contiguous_format),
    "3d_l1": ((C, 1), torch.contiguous_format),
    "nchw": ((C, 3, 4), torch.contiguous_format),
    "channels_last": ((C, 3, 4), torch.channels_last),
    "5d": ((C, 2, 2, 3), torch.contiguous_format),
    "channels_last_3d": ((C, 2, 2, 3), torch.channels_last_3d),
}
REF_CLS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

TOL = {
    torch.float64: dict(atol=1e-9, rtol=1e-9),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}
STEPS = 3


# --------------------------------------------------------------------------- #
# the two launchers                                                            #
# --------------------------------------------------------------------------- #

class Context:
    """Rank, world size, the test's own reductions, and the process groups to try."""

    kind: str
    rank: int
    size: int

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's ``t`` (same shape everywhere) stacked: ``(size, *t.shape)`` float64.

        The test's own collective, kept apart from the layer's communicator
        so it never shows in ``layer.communicator.calls``.
        """
        buf = torch.zeros(self.size, t.numel(), dtype=torch.float64)
        buf[self.rank] = t.detach().reshape(-1).to(torch.float64)
        self._sum(buf.view(-1))
        return buf.view(self.size, *t.shape)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.gather(t).sum(0)

    def _sum(self, buf: torch.Tensor) -> None:
        raise NotImplementedError

    def spec(self, label: str) -> Any:
        """The ``process_group`` argument a case names."""
        raise NotImplementedError

    def expected_comm(self, label: str) -> tuple[type, int]:
        """Communicator class and size the layer must resolve ``label`` to."""
        raise NotImplementedError

    def barrier(self) -> None:
        self._sum(torch.zeros(1, dtype=torch.float64))


class MPIContext(Context):
    kind = "mpi"

    def __init__(self) -> None:
        from mpi4py import MPI

        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self._helper = self.world.Dup()
        # ranks {0, 1} and {2, 3}
        self.split = self.world.Split(color=self.rank // 2, key=self.rank)

    def _sum(self, buf: torch.Tensor) -> None:
        self._helper.Allreduce(self.MPI.IN_PLACE, buf.numpy(), op=self.MPI.SUM)

    def spec(self, label: str) -> Any:
        return {
            "default": "mpi",
            "auto": None,
            "comm_world": self.world,
            "communicator": MPICommunicator(self.world),
            "subgroup": self.split,
        }[label]

    def expected_comm(self, label: str) -> tuple[type, int]:
        return MPICommunicator, 2 if label == "subgroup" else self.size


class TorchContext(Context):
    kind = "torch"

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        # a desynchronized collective raises instead of waiting 30 minutes
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        # every rank creates every group, in the same order
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        self.subgroup = groups[self.rank // 2]

    def _sum(self, buf: torch.Tensor) -> None:
        self.dist.all_reduce(buf, op=self.dist.ReduceOp.SUM)

    def spec(self, label: str) -> Any:
        return {
            "default": "torch",
            "auto": None,
            "world_group": self.dist.group.WORLD,
            "communicator": TorchCommunicator(),
            "subgroup": self.subgroup,
        }[label]

    def expected_comm(self, label: str) -> tuple[type, int]:
        # None and a ProcessGroup resolve to shared memory (the launch is on
        # one host); "torch" and a TorchCommunicator stay on gloo
        shm = label in ("auto", "world_group", "subgroup") and syncbn.comm.shm.shm_enabled()
        return (SharedMemoryCommunicator if shm else TorchCommunicator,
                2 if label == "subgroup" else self.size)


# --------------------------------------------------------------------------- #
# checks that record instead of raising                                        #
# --------------------------------------------------------------------------- #

class Checker:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.max_err = 0.0
        self.notes: dict[str, str] = {}

    def close(self, what: str, actual: Optional[torch.Tensor], expected: Optional[torch.Tensor],
              tol: dict[str, float]) -> None:
        if actual is None or expected is None:
            self.check(what, actual is None and expected is None,
                       f"one of actual/expected is None ({actual is None}/{expected is None})")
            return
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            self.failures.append(f"{what}: shape/dtype {tuple(actual.shape)} {actual.dtype} "
                                 f"(expected {tuple(expected.shape)} {expected.dtype})")
            return
        a, e = actual.detach().double(), expected.detach().double()
        if not torch.isfinite(a).all():
            self.failures.append(f"{what}: non-finite values")
            return
        err = float((a - e).abs().max()) if a.numel() else 0.0
        self.max_err = max(self.max_err, err)
        if not torch.allclose(a, e, atol=tol["atol"], rtol=tol["rtol"]):
            self.failures.append(f"{what}: max_err={err:.3g}")

    def check(self, what: str, ok: bool, detail: str = "") -> None:
        if not ok:
            self.failures.append(f"{what}{': ' + detail if detail else ''}")

    def differs(self, what: str, a: torch.Tensor, b: torch.Tensor, min_diff: float,
                note: str = "neg_diff") -> None:
        """Negative control: ``a`` and ``b`` must differ by more than ``min_diff``."""
        diff = float((a.detach().double() - b.detach().double()).abs().max())
        self.notes[note] = f"{diff:.3g}"
        self.check(f"negative control {what}", diff > min_diff,
                   f"differs by only {diff:.3g} (need > {min_diff})")


def report(ctx: Context, name: str, chk: Checker) -> bool:
    notes = "".join(f" {k}={v}" for k, v in chk.notes.items())
    if chk.failures:
        say(f"rank {ctx.rank} case {name} FAIL " + "; ".join(chk.failures))
        return False
    say(f"rank {ctx.rank} case {name} ok max_err={chk.max_err:.2g}{notes}")
    return True


# --------------------------------------------------------------------------- #
# data                                                                         #
# --------------------------------------------------------------------------- #

def _seed(name: str) -> int:
    return zlib.crc32(name.encode())


def global_batch(gen: torch.Generator, n: int, layout: str,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``(x, g)`` on every rank: input (per-channel offset and scale) and loss weight."""
    sample, fmt = LAYOUTS[layout]
    return batch((n, *sample), gen, dtype, fmt)


# --------------------------------------------------------------------------- #
# cases                                                                        #
# --------------------------------------------------------------------------- #

def case_batchnorm(ctx: Context, name: str, sizes: list[int], layout: str, dtype: torch.dtype,
                   spec: str = "default", momentum: Optional[float] = 0.1,
                   affine: bool = True, activation: Optional[str] = None,
                   negative_slope: float = 0.01, residual: bool = False,
                   python_path: bool = False) -> Checker:
    """The layer on this rank's shard against plain BatchNorm on the group's whole batch.

    ``sizes[r]``: samples of world rank r. With ``spec="subgroup"`` the group
    is ranks {0, 1} or {2, 3} and the reference batch is the group's shards
    only. Parameter gradients: the layer's are local sums over the shard;
    the loss ``sum(y * g)`` is summed over the global batch, so the
    reference's gradient is the SUM over the group's ranks of the local
    gradients (what DDP does up to its 1/world_size averaging); that sum is
    what is compared.

    With ``activation`` / ``residual``, the layer is the fused
    ``activation(bn(x) + residual)`` and the reference torch's composition of
    those steps; the residual's gradient is compared too.

    Training calls go through the C++ node where it is built and the shard
    has values (an empty shard's rank takes the Python function, while the
    others wait for it in the same collectives); ``python_path=True`` takes
    the node away for the case, so every rank runs the Python function.
    """
    node = None if python_path else _cpp_node_loader.NODE
    saved_node, function.NODE = function.NODE, node
    try:
        return _batchnorm_steps(ctx, name, sizes, layout, dtype, spec, momentum, affine, activation,
                                negative_slope, residual, node is not None)
    finally:
        function.NODE = saved_node


def _batchnorm_steps(ctx: Context, name: str, sizes: list[int], layout: str, dtype: torch.dtype,
                     spec: str, momentum: Optional[float], affine: bool, activation: Optional[str],
                     negative_slope: float, residual: bool, node_in_use: bool) -> Checker:
    """case_batchnorm's steps, with the node in use or not."""
    chk = Checker()
    members = [r for r in range(ctx.size) if spec != "subgroup" or r // 2 == ctx.rank // 2]
    offsets = [sum(sizes[:r]) for r in range(ctx.size + 1)]
    # this rank's rows within the world batch and within its group's batch
    world_rows = slice(offsets[ctx.rank], offsets[ctx.rank + 1])
    group_index = torch.cat([torch.arange(offsets[r], offsets[r + 1]) for r in members])
    start = sum(sizes[r] for r in members if r < ctx.rank)
    group_rows = slice(start, start + sizes[ctx.rank])
    fmt = LAYOUTS[layout][1]
    ndim = len(LAYOUTS[layout][0]) + 1

    layer = syncbn.SyncBatchNorm(C, momentum=momentum, affine=affine, dtype=dtype,
                                 process_group=ctx.spec(spec), activation=activation,
                                 negative_slope=negative_slope)
    ref = REF_CLS[ndim](C, momentum=momentum, affine=affine, dtype=dtype)

    def composed(bn: nn.Module, x: torch.Tensor, r: Optional[torch.Tensor]) -> torch.Tensor:
        return apply_activation(bn(x) if r is None else bn(x) + r, activation, negative_slope)

    set_random_affine(layer, _seed(name))  # the same on every rank
    ref.load_state_dict(layer.state_dict())
    comm_cls, comm_size = ctx.expected_comm(spec)
    chk.check("communicator", type(layer.communicator) is comm_cls
              and layer.communicator.size == comm_size, repr(layer.communicator))

    tol = TOL[dtype]
    gen = torch.Generator().manual_seed(_seed(name))
    for step in range(STEPS):
        xw, gw = global_batch(gen, offsets[-1], layout, dtype)
        x_group, g_group = xw[group_index].contiguous(memory_format=fmt), gw[group_index]
        x = xw[world_rows].clone().contiguous(memory_format=fmt).requires_grad_()
        rw = global_batch(gen, offsets[-1], layout, dtype)[0] if residual else None
        r = None if rw is None else rw[world_rows].clone().requires_grad_()
        y = layer(x) if r is None else layer(x, r)
        through_node = y.grad_fn is not None and y.grad_fn.name() == NODE_NAME
        chk.check(f"step {step} path", through_node == (node_in_use and x.numel() > 0),
                  f"through the C++ node: {through_node}; node in use: {node_in_use}, "
                  f"{x.numel()} local values")
        (y * gw[world_rows]).sum().backward()

        xr = x_group.clone().requires_grad_()
        rr = None if rw is None else rw[group_index].clone().requires_grad_()
        yr = composed(ref, xr, rr)
        (yr * g_group).sum().backward()
        if r is not None:
            chk.close(f"step {step} residual grad", r.grad, rr.grad[group_rows], tol)

        chk.close(f"step {step} output", y, yr[group_rows], tol)
        # (an empty shard's memory format is test_module.py's concern)
        chk.check(f"step {step} output memory format",
                  y.is_contiguous(memory_format=fmt) or y.numel() == 0)
        chk.close(f"step {step} input grad", x.grad, xr.grad[group_rows], tol)
        if affine:
            for pname in ("weight", "bias"):
                local = getattr(layer, pname).grad
                chk.check(f"step {step} {pname} grad dtype", local.dtype == dtype)
                summed = ctx.gather(local)[members].sum(0).to(dtype)
                chk.close(f"step {step} {pname} grad (sum over ranks)", summed,
                          getattr(ref, pname).grad, tol)
        chk.close(f"step {step} running_mean", layer.running_mean, ref.running_mean, tol)
        chk.close(f"step {step} running_var", layer.running_var, ref.running_var, tol)
        if step == 0:
            # Negative control: plain BN on this rank's shard (local
            # statistics) must not give the global answer. Ranks whose shard
            # has fewer than 2 values per channel cannot run plain BN.
            if x.numel() // C >= 2:
                plain = REF_CLS[ndim](C, momentum=momentum, affine=affine, dtype=dtype)
                plain.load_state_dict(ref.state_dict())
                chk.differs("(plain BN on the shard)", composed(plain, x.detach(), r),
                            yr[group_rows], 1e-3)
            if spec == "subgroup":
                world_ref = REF_CLS[ndim](C, affine=affine, dtype=dtype)
                world_ref.load_state_dict(ref.state_dict())
                chk.differs("(statistics over the whole world)",
                            world_ref(xw)[world_rows], yr[group_rows], 1e-3, "neg_world_diff")
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    chk.check("num_batches_tracked", int(layer.num_batches_tracked) == STEPS
              and int(ref.num_batches_tracked) == STEPS, str(layer.num_batches_tracked))
    chk.check("collectives in training", layer.communicator.calls == 2 * STEPS,
              f"{layer.communicator.calls} (expected {2 * STEPS})")

    # eval: running statistics, no communication
    layer.eval()
    ref.eval()
    xw, rw = global_batch(gen, offsets[-1], layout, dtype)
    if residual:
        chk.close("eval output", layer(xw[world_rows], rw[world_rows]),
                  composed(ref, xw[group_index], rw[group_index])[group_rows], tol)
    else:
        chk.close("eval output", layer(xw[world_rows]),
                  composed(ref, xw[group_index], None)[group_rows], tol)
    chk.check("collectives in eval", layer.communicator.calls == 2 * STEPS,
              f"{layer.communicator.calls} (expected {2 * STEPS})")
    return chk


def case_global_count_one(ctx: Context) -> Checker:
    """One sample in the whole world, 2-D input: every rank raises the same ValueError."""
    chk = Checker()
    layer = syncbn.SyncBatchNorm(C, process_group=ctx.spec("default"))
    x = torch.randn(1 if ctx.rank == 0 else 0, C)
    try:
        layer(x)
        chk.check("ValueError", False, "no error raised")
    except ValueError as exc:
        chk.check("error message", "1 value per channel" in str(exc), str(exc))
    chk.check("num_batches_tracked untouched", int(layer.num_batches_tracked) == 0)
    chk.check("running_mean untouched", not layer.running_mean.any())
    # the layer is still in step with the other ranks afterwards
    chk.check("usable after the error", layer(torch.randn(2, C)).shape == (2, C))
    return chk


def case_all_empty(ctx: Context) -> Checker:
    """An empty global batch: empty output, zero grads, buffers untouched, no NaN."""
    chk = Checker()
    layer = syncbn.SyncBatchNorm(C, process_group=ctx.spec("default"))
    x = torch.randn(0, C, 4, requires_grad=True)
    y = layer(x)
    (y * 2).sum().backward()
    chk.check("output shape", y.shape == x.shape)
    chk.check("input grad shape", x.grad is not None and x.grad.shape == x.shape)
    chk.check("weight grad zero", not layer.weight.grad.any()
              and torch.isfinite(layer.weight.grad).all())
    chk.check("buffers untouched", int(layer.num_batches_tracked) == 0
              and not layer.running_mean.any() and bool((layer.running_var == 1).all()))
    chk.check("collectives", layer.communicator.calls == 1, str(layer.communicator.calls))
    return chk


class CountingMPIComm:
    """Wraps an mpi4py communicator and counts its ``Allreduce`` calls."""

    def __init__(self, comm: Any) -> None:
        self._comm = comm
        self.allreduces = 0

    def Allreduce(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802 (mpi4py's name)
        self.allreduces += 1
        return self._comm.Allreduce(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._comm, name)


def case_collective_count(ctx: Context) -> Checker:
    """Exactly 2 allreduces per layer per training step, 1 per no_grad forward, 0 in eval.

    Counted twice: by ``layer.communicator.calls`` and underneath it, at the
    backend (mpi4py ``Allreduce`` through a counting wrapper;
    ``torch.distributed.all_reduce`` monkeypatched).
    """
    chk = Checker()
    counter = {"n": 0}
    restore: Optional[Callable[[], None]] = None
    if isinstance(ctx, MPIContext):
        wrapped = CountingMPIComm(ctx.world)

        def make_spec() -> Any:
            return MPICommunicator(wrapped)

        def backend_count() -> int:
            return wrapped.allreduces
    else:
        dist = ctx.dist
        original = dist.all_reduce

        def counting_all_reduce(*args: Any, **kwargs: Any) -> Any:
            counter["n"] += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting_all_reduce

        def restore() -> None:
            dist.all_reduce = original

        def make_spec() -> Any:
            return "torch"

        def backend_count() -> int:
            return counter["n"]
    try:
        layers = [syncbn.SyncBatchNorm(C, process_group=make_spec()) for _ in range(2)]
        model = nn.Sequential(layers[0], nn.ReLU(), nn.Conv2d(C, C, 1), layers[1])
        steps = 3
        for _ in range(steps):
            x = torch.randn(2 + ctx.rank, C, 3, 3, requires_grad=True)
            model(x).square().sum().backward()
        for i, layer in enumerate(layers):
            chk.check(f"layer {i} calls in training", layer.communicator.calls == 2 * steps,
                      str(layer.communicator.calls))
        chk.check("backend allreduces in training", backend_count() == 2 * 2 * steps,
                  f"{backend_count()} (expected {4 * steps})")
        with torch.no_grad():
            model(torch.randn(2, C, 3, 3))
        chk.check("backend allreduces, no_grad forward", backend_count() == 4 * steps + 2,
                  str(backend_count()))
        model.eval()
        model(torch.randn(2, C, 3, 3, requires_grad=True)).sum().backward()
        with torch.no_grad():
            model(torch.randn(2, C, 3, 3))
        chk.check("backend allreduces in eval", backend_count() == 4 * steps + 2,
                  str(backend_count()))
        chk.check("layer calls in eval", [l.communicator.calls for l in layers] == [7, 7],
                  str([l.communicator.calls for l in layers]))
        if isinstance(ctx, TorchContext) and syncbn.comm.shm.shm_enabled():
            # the default, shared memory on this host: no torch.distributed
            # collective at all once the group's segment exists
            layer = syncbn.SyncBatchNorm(C)
            layer.communicator  # resolved (set-up collectives, if the segment is new)
            before = backend_count()
            for _ in range(steps):
                layer(torch.randn(2, C, 3, 3, requires_grad=True)).sum().backward()
            chk.check("shm layer: backend allreduces", backend_count() == before,
                      str(backend_count() - before))
            chk.check("shm layer: calls", layer.communicator.calls == 2 * steps,
                      str(layer.communicator.calls))
    finally:
        if restore is not None:
            restore()
    return chk


class _ShardOf(torch.autograd.Function):
    """Forward: this rank's rows of a replicated global tensor. Backward: the
    full global gradient, every rank's rows gathered (a replicated input's
    gradient is the sum of what every rank's graph contributes)."""

    @staticmethod
    def forward(ctx: Any, xw: torch.Tensor, rows: slice, wctx: Context) -> torch.Tensor:
        ctx.rows, ctx.wctx, ctx.shape = rows, wctx, xw.shape
        return xw[rows].clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        full = torch.zeros(ctx.shape, dtype=grad.dtype)
        full[ctx.rows] = grad
        return ctx.wctx.sum(full).to(grad.dtype), None, None


class _Replicated(torch.autograd.Function):
    """Forward: identity on a tensor every rank holds alike. Backward: SUM over ranks."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor, wctx: Context) -> torch.Tensor:
        ctx.wctx = wctx
        return t.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return ctx.wctx.sum(grad).to(grad.dtype), None


class _Gather(torch.autograd.Function):
    """Forward: the global output, every rank's rows (replicated on all ranks).
    Backward: this rank's rows of the (replicated) output gradient."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, rows: slice, shape: torch.Size,
                wctx: Context) -> torch.Tensor:
        ctx.rows = rows
        full = torch.zeros(shape, dtype=y.dtype)
        full[rows] = y
        return wctx.sum(full).to(y.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return grad[ctx.rows].contiguous(), None, None, None


def case_gradcheck(ctx: Context) -> Checker:
    """torch.autograd.gradcheck of the global map (x_global, weight, bias) -> y_global.

    Why not gradcheck on each rank's shard: gradcheck perturbs one element
    of its input per forward; every rank would perturb its own shard at the
    same time, so each numerical derivative would mix four perturbations
    (and uneven shards would even give different call counts, hence a
    deadlock). Instead every rank holds the whole global input, weight and
    bias (the same values, perturbed alike, in the same order, since
    gradcheck is deterministic), takes its shard inside the function
    (_ShardOf), and returns the whole global output (_Gather). The wrappers'
    backwards make the analytical Jacobian the true global one (gathered
    input rows, summed weight/bias gradients), so all ranks run the same
    collectives in the same order and check the full Jacobian, including
    the cross-rank terms that go through the allreduced statistics. Uneven
    shards with an empty one, float64.
    """
    chk = Checker()
    sizes = [2, 0, 3, 1]
    offsets = [sum(sizes[:r]) for r in range(ctx.size + 1)]
    rows = slice(offsets[ctx.rank], offsets[ctx.rank + 1])
    layer = syncbn.SyncBatchNorm(C, dtype=torch.float64, process_group=ctx.spec("default"))
    gen = torch.Generator().manual_seed(_seed("gradcheck"))
    xw, _ = global_batch(gen, offsets[-1], "3d_l1", torch.float64)
    xw = torch.cat([xw, xw.square()], dim=2)      # (6, C, 2)
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()

    def f(xw: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x = _ShardOf.apply(xw, rows, ctx)
        params = {"weight": _Replicated.apply(w, ctx), "bias": _Replicated.apply(b, ctx)}
        y = torch.func.functional_call(layer, params, (x,))
        return _Gather.apply(y, rows, xw.shape, ctx)

    ok = torch.autograd.gradcheck(f, (xw.requires_grad_(), w, b), raise_exception=False)
    chk.check("gradcheck", ok)
    # negative control: the same map with local statistics has another Jacobian
    plain = nn.BatchNorm1d(C, dtype=torch.float64)

    def g(xw: torch.Tensor) -> torch.Tensor:
        x = _ShardOf.apply(xw, rows, ctx)
        y = plain(x) if x.shape[0] * x.shape[2] > 1 else x * 0 + 1
        return _Gather.apply(y, rows, xw.shape, ctx)

    jac_sync = torch.autograd.functional.jacobian(
        lambda xw: f(xw, w.detach(), b.detach()), xw.detach())
    jac_plain = torch.autograd.functional.jacobian(g, xw.detach())
    chk.differs("(Jacobian with local statistics)", jac_plain, jac_sync, 1e-3)
    return chk


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


def _train(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
           reduce_loss: Callable[[torch.Tensor], float]) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for x, t in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), t)      # mean over the samples given
        loss.backward()
        opt.step()
        losses.append(reduce_loss(loss.detach()))
    return losses


def case_ddp(ctx: Context) -> Checker:
    """DDP (gloo, CPU) with converted SyncBatchNorm against one process on the global batch.

    Each rank's loss is the mean over its equal shard and DDP averages the
    gradients, so the baseline's loss is the mean over the global batch.
    float64, tolerance 1e-5 (losses and every parameter and buffer).
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    chk = Checker()
    torch.manual_seed(0)
    base = _net().double()
    gen = torch.Generator().manual_seed(_seed("ddp"))
    per_rank, steps = 2, 4
    n = per_rank * ctx.size
    data = [(torch.randn(n, 3, 6, 6, generator=gen, dtype=torch.float64) * 2 + 1,
             torch.randint(0, 3, (n,), generator=gen)) for _ in range(steps)]
    rows = slice(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)
    shards = [(x[rows], t[rows]) for x, t in data]

    def global_mean(loss: torch.Tensor) -> float:
        return float(ctx.sum(loss.detach())) / ctx.size

    baseline = copy.deepcopy(base)
    base_losses = _train(baseline, data, float)

    model = DDP(syncbn.convert_sync_batchnorm(copy.deepcopy(base), process_group="torch"))
    chk.check("converted", sum(isinstance(m, syncbn.SyncBatchNorm) for m in model.modules()) == 3)
    losses = _train(model, shards, global_mean)
    tol = dict(atol=1e-5, rtol=1e-5)
    chk.close("losses", torch.tensor(losses), torch.tensor(base_losses), tol)
    for (name, p), q in zip(model.module.named_parameters(), baseline.parameters()):
        chk.close(f"parameter {name}", p, q, tol)
    for (name, p), q in zip(model.module.named_buffers(), baseline.buffers()):
        chk.close(f"buffer {name}", p.double(), q.double(), tol)
    chk.notes["loss"] = f"{base_losses[0]:.4f}->{base_losses[-1]:.4f}"

    # negative control: DDP with plain BatchNorm2d (per-rank statistics)
    plain = DDP(copy.deepcopy(base))
    _train(plain, shards, global_mean)
    chk.differs("(DDP with plain BatchNorm2d)", nn.utils.parameters_to_vector(plain.parameters()),
                nn.utils.parameters_to_vector(baseline.parameters()), 1e-3)
    return chk


# --------------------------------------------------------------------------- #
# case lists                                                                   #
# --------------------------------------------------------------------------- #

f32, f64 = torch.float32, torch.float64

# name -> (sizes per world rank, layout, dtype, process_group label, extra kwargs)
COMMON_BN_CASES: dict[str, tuple[list[int], str, torch.dtype, str, dict[str, Any]]] = {
    "equal_nchw_f32": ([2, 2, 2, 2], "nchw", f32, "default", {}),
    "equal_nchw_f64": ([2, 2, 2, 2], "nchw", f64, "auto", {}),
    "uneven_channels_last_f32": ([3, 1, 2, 4], "channels_last", f32, "default",
                                 {"momentum": 0.3}),
    "uneven_channels_last_f64": ([1, 4, 3, 2], "channels_last", f64, "communicator", {}),
    "uneven_5d_f32": ([2, 1, 3, 2], "5d", f32, "default", {"momentum": None}),
    "uneven_5d_f64": ([1, 2, 2, 3], "5d", f64, "default", {}),
    "size1_2d_f64": ([1, 3, 2, 2], "2d", f64, "default", {}),
    "size1_3d_l1_f32": ([2, 1, 1, 3], "3d_l1", f32, "default", {}),
    "empty_shard_nchw_f64": ([3, 0, 2, 1], "nchw", f64, "default", {}),
    "empty_shard_2d_f32": ([2, 2, 0, 3], "2d", f32, "default", {"affine": False}),
    "empty_shard_channels_last_3d_f64": ([0, 2, 1, 2], "channels_last_3d", f64, "default",
                                         {"momentum": None}),
    "subgroup_nchw_f64": ([3, 1, 2, 4], "nchw", f64, "subgroup", {}),
    "subgroup_channels_last_f32": ([2, 3, 1, 2], "channels_last", f32, "subgroup", {}),
    # activation(bn(x) + residual) in one layer
    "fused_relu_residual_nchw_f32": ([2, 3, 2, 1], "nchw", f32, "default",
                                     {"activation": "relu", "residual": True}),
    "fused_silu_channels_last_f64": ([3, 1, 2, 4], "channels_last", f64, "default",
                                     {"activation": "silu", "momentum": None}),
    "fused_relu6_residual_5d_f32": ([1, 2, 2, 3], "5d", f32, "default",
                                    {"activation": "relu6", "residual": True}),
    "fused_leaky_negative_empty_shard_2d_f64": ([2, 2, 0, 3], "2d", f64, "default",
                                                {"activation": "leaky_relu", "negative_slope": -0.5,
                                                 "residual": True}),
    # the Python function on every rank, as where the C++ node is not built
    "python_path_uneven_channels_last_f32": ([3, 1, 2, 4], "channels_last", f32, "default",
                                             {"momentum": 0.3, "python_path": True}),
    "python_path_size1_2d_f64": ([1, 3, 2, 2], "2d", f64, "default", {"python_path": True}),
    "python_path_fused_silu_residual_nchw_f64": ([2, 3, 2, 1], "nchw", f64, "default",
                                                 {"activation": "silu", "residual": True,
                                                  "python_path": True}),
}
BN_CASES = {
    "mpi": {**COMMON_BN_CASES,
            "comm_world_nchw_f32": ([2, 3, 2, 1], "nchw", f32, "comm_world", {})},
    "torch": {**COMMON_BN_CASES,
              "world_group_nchw_f32": ([2, 3, 2, 1], "nchw", f32, "world_group", {})},
}
OTHER_CASES: dict[str, dict[str, Callable[[Context], Checker]]] = {
    "mpi": {"global_count_one": case_global_count_one, "all_empty": case_all_empty,
            "collective_count": case_collective_count, "gradcheck": case_gradcheck},
    "torch": {"global_count_one": case_global_count_one, "all_empty": case_all_empty,
              "collective_count": case_collective_count, "gradcheck": case_gradcheck,
              "ddp": case_ddp},
}


def main(kind: str, only: Optional[list[str]] = None) -> int:
    os.environ.pop("SYNCBN_DEBUG", None)     # counts below are those of the normal mode
    torch.set_num_threads(1)
    ctx: Context = MPIContext() if kind == "mpi" else TorchContext()
    if ctx.size != WORLD:
        raise SystemExit(f"dist_worker: expected {WORLD} ranks (got {ctx.size})")
    cases: dict[str, Callable[[], Checker]] = {}
    for name, (sizes, layout, dtype, spec, kw) in BN_CASES[kind].items():
        cases[name] = (lambda name=name, sizes=sizes, layout=layout, dtype=dtype, spec=spec, kw=kw:
                       case_batchnorm(ctx, name, sizes, layout, dtype, spec, **kw))
    for name, fn in OTHER_CASES[kind].items():
        cases[name] = (lambda fn=fn: fn(ctx))
    failed = 0
    for name, run in cases.items():
        if only and name not in only:
            continue
        failed += not report(ctx, name, run())
    ctx.barrier()
    say(f"rank {ctx.rank} done failed={failed}")
    if kind == "torch":
        ctx.dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("mpi", "torch"):
        raise SystemExit("usage: dist_worker.py {mpi|torch} [case ...]")
    leave(main(sys.argv[1], sys.argv[2:]))
