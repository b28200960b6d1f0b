"""SyncBatchNorm under torch.compile (fullgraph, no graph break) and torch.export.

One process here; tests/compile_worker.py runs the same comparison on 2
ranks under mpiexec and torchrun (the ``launcher`` tests at the end).
Compiling costs tens of seconds on a small machine, so each compiled test
runs several checks on one tiny network; they are marked ``slow``.
"""
from __future__ import annotations

import copy
import gc
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import torch.nn as nn

import syncbn
from syncbn import SyncBatchNorm, _ops

from launch import Job, mpiexec_command, run_job, torchrun_command

TESTS = Path(__file__).resolve().parent
WORKER = TESTS / "compile_worker.py"
TOL = dict(atol=1e-4, rtol=1e-4)  # float32: inductor orders the convolutions' sums its own way


@pytest.fixture(autouse=True, scope="module")
def fresh_inductor_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Compile into a cache of this run's own: inductor's on-disk cache (under
    /tmp by default) outlives the process, and a graph cached by another
    version of the operators would be reused here (docs/compile.md). The
    workers the launcher tests start inherit the variable."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Net(nn.Module):
    """conv - SyncBatchNorm - ReLU - conv - SyncBatchNorm(momentum=None) - SyncBatchNorm(no
    running statistics), the layers' process group ``"local"``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = SyncBatchNorm(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = SyncBatchNorm(4, momentum=None)
        self.bn3 = SyncBatchNorm(4, track_running_stats=False, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn3(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class Broken(nn.Module):
    """The same network with a deliberate graph break in the middle."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        torch._dynamo.graph_break()
        return y + 1


def _inputs(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x = 3 + 2 * torch.randn(4, 3, 5, 5, generator=g)
    # the last step channels-last: the kernels read it in place, the output keeps it
    return x.to(memory_format=torch.channels_last) if step == 2 else x


def _close(what: str, a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> None:
    assert a is not None and b is not None, what
    assert a.dtype == b.dtype and a.shape == b.shape, what
    torch.testing.assert_close(a, b, **TOL, msg=lambda m: f"{what}: {m}")


def _train_side_by_side(model: nn.Module, steps: int = 3) -> nn.Module:
    """Train ``torch.compile(model, fullgraph=True)`` and an eager copy with SGD; compare every step."""
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    opt_c = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    for step in range(steps):
        x = _inputs(step)
        xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
        yc, ye = compiled(xc), eager(xe)
        _close(f"step {step} output", yc, ye)
        assert yc.stride() == ye.stride(), f"step {step}: memory format"
        weights = torch.linspace(-1, 1, ye.numel()).reshape(ye.shape)
        (yc * weights).sum().backward()
        (ye * weights).sum().backward()
        _close(f"step {step} input grad", xc.grad, xe.grad)
        for (name, pc), pe in zip(model.named_parameters(), eager.parameters()):
            _close(f"step {step} {name}.grad", pc.grad, pe.grad)
        opt_c.step(), opt_e.step(), opt_c.zero_grad(), opt_e.zero_grad()
        for (name, bc), be in zip(model.named_buffers(), eager.buffers()):
            _close(f"step {step} {name}", bc, be)
    return eager


@pytest.mark.slow
def test_compiled_training_and_eval_match_eager() -> None:
    torch.manual_seed(0)
    model = Net()
    eager = _train_side_by_side(model)
    assert int(model.bn2.num_batches_tracked) == 3  # the cumulative average counted the steps
    # eval: running statistics (bn1, bn2), local batch statistics (bn3)
    model.eval(), eager.eval()
    compiled = torch.compile(model, fullgraph=True)
    x = _inputs(7).requires_grad_()
    xe = x.detach().clone().requires_grad_()
    y, ye = compiled(x), eager(xe)
    _close("eval output", y, ye)
    y.sum().backward(), ye.sum().backward()
    _close("eval input grad", x.grad, xe.grad)


@pytest.mark.slow
def test_no_graph_break_and_the_check_can_fail() -> None:
    torch.manual_seed(0)
    model = Net()
    x = _inputs(0)
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    model.eval()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    model.train()
    torch._dynamo.reset()
    # negative control: a deliberate break is counted, and fullgraph refuses it
    broken = Broken(model)
    assert torch._dynamo.explain(broken)(x).graph_break_count > 0
    torch._dynamo.reset()
    with pytest.raises(Exception, match="graph_break|Graph break|graph break"):
        torch.compile(broken, fullgraph=True)(x)
    torch._dynamo.reset()
    # debug mode stays on the eager path, which dynamo cannot trace
    model.bn1.debug = True
    assert torch._dynamo.explain(model)(x).graph_break_count > 0


@pytest.mark.slow
def test_compiled_global_count_one_raises_and_changes_nothing() -> None:
    bn = SyncBatchNorm(3)
    compiled = torch.compile(bn, fullgraph=True)
    compiled(torch.randn(4, 3))  # compiled for (N, 3) inputs once
    before = {name: t.clone() for name, t in bn.named_buffers()}
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        compiled(torch.randn(1, 3, requires_grad=True))
    for name, t in bn.named_buffers():
        assert torch.equal(t, before[name]), name


@pytest.mark.slow
def test_compiled_wrong_channels_raise_before_any_operator() -> None:
    bn = SyncBatchNorm(3, process_group=syncbn.comm.LocalCommunicator())
    with pytest.raises(Exception) as info:
        torch.compile(bn, fullgraph=True)(torch.randn(4, 5))
    chain = []
    exc: Optional[BaseException] = info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("expected input with 3 channels" in text for text in chain), chain
    assert bn.communicator.calls == 0
    assert int(bn.num_batches_tracked) == 0


def test_export_eval_mode() -> None:
    torch.manual_seed(0)
    model = Net()
    model.bn3 = nn.Identity()  # (a layer without running statistics keeps its operators)
    model(_inputs(0))  # some running statistics
    model.eval()
    x = _inputs(3)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    # a portable program: no syncbn operator, no shift
    assert "syncbn" not in exported.graph_module.code
    assert not any("shift" in name for name in [*exported.state_dict, *exported.constants])


def test_export_training_mode_runs_in_process() -> None:
    torch.manual_seed(0)
    model = Net()
    eager = copy.deepcopy(model)
    x = _inputs(0)
    exported = torch.export.export(model, (x,))
    assert "torch.ops.syncbn.batch_stats" in exported.graph_module.code
    torch.testing.assert_close(exported.module()(x), eager(x), **TOL)


# --- the operators alone ---------------------------------------------------------------

def test_operators_pass_opcheck() -> None:
    torch.manual_seed(0)
    C = 3
    for x in (torch.randn(4, C, 2, 3, dtype=torch.float64),
              torch.randn(4, C, 2, 3).to(memory_format=torch.channels_last),
              torch.randn(5, C),
              torch.randn(4, C, 3).to(torch.bfloat16)):
        shift = torch.zeros(C, dtype=torch.float64)
        running = (torch.zeros(C, dtype=x.dtype), torch.ones(C, dtype=x.dtype),
                   torch.tensor(0, dtype=torch.long))
        torch.library.opcheck(_ops.batch_stats, (x, shift, *running, 1e-5, None, _ops.LOCAL))
        stats, count = _ops.batch_stats(x, shift, *running, 1e-5, 0.1, _ops.LOCAL)
        w = torch.rand(C, dtype=x.dtype, requires_grad=True)
        b = torch.randn(C, dtype=x.dtype, requires_grad=True)
        torch.library.opcheck(_ops.normalize,
                              (x.clone().requires_grad_(), w, b, stats, count, _ops.LOCAL))
        dy = torch.randn_like(x)
        for input_grad in (True, False):
            torch.library.opcheck(_ops.normalize_backward,
                                  (dy, x, w.detach(), stats, count, _ops.LOCAL, input_grad))


def test_operators_gradient_is_batch_norms() -> None:
    torch.manual_seed(0)
    C = 3
    x = (2 + torch.randn(5, C, 4, dtype=torch.float64)).requires_grad_()
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shift = torch.zeros(C, dtype=torch.float64)
        return _ops.sync_batch_norm(x, w, b, shift, None, None, None, 1e-5, 0.1, _ops.LOCAL)

    assert torch.autograd.gradcheck(fn, (x, w, b))
    ref = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.1, 1e-5)
    torch.testing.assert_close(fn(x, w, b), ref)


class PartnerWithoutSamples(syncbn.comm.Communicator):
    """Two ranks, the other with an empty batch: the sums stay as they are,
    but the layer takes the path of a synchronized group."""

    _size = 2

    def _allreduce(self, buf: torch.Tensor) -> None:
        pass


@pytest.mark.parametrize("group", ["alone", "synchronized"])
def test_operators_match_the_eager_layer(group: str) -> None:
    torch.manual_seed(0)
    comm = PartnerWithoutSamples() if group == "synchronized" else None
    bn = SyncBatchNorm(3, momentum=None, process_group=comm)
    ref = copy.deepcopy(bn)
    x = (5 + torch.randn(6, 3, 4)).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    y = _ops.sync_batch_norm(x, bn.weight, bn.bias, bn._shift_tensor, bn.running_mean,
                             bn.running_var, bn.num_batches_tracked, bn.eps, bn.momentum, bn._op_key)
    yr = ref(xr)
    torch.testing.assert_close(y, yr)
    y.square().sum().backward(), yr.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(bn.weight.grad, ref.weight.grad)
    for name, t in bn.named_buffers():
        torch.testing.assert_close(t, dict(ref.named_buffers())[name], msg=name)
    # one forward, one backward allreduce, through the key (none for a group of one)
    assert bn.communicator.calls == (2 if group == "synchronized" else 0)


# --- the shift buffer and the registry -------------------------------------------------

def test_shift_is_float64_state_outside_buffers_and_state_dict() -> None:
    bn = SyncBatchNorm(3)
    assert set(bn.state_dict()) == set(nn.BatchNorm1d(3).state_dict())
    assert [n for n, _ in bn.named_buffers()] == [n for n, _ in nn.BatchNorm1d(3).named_buffers()]
    bn(torch.randn(8, 3) + 4)
    shift = bn._shift_tensor.clone()
    assert shift.abs().min() > 1  # it followed the global mean
    bn.half()
    assert bn._shift_tensor.dtype == torch.float64 and torch.equal(bn._shift_tensor, shift)
    bn._shift[0] = 7.0  # the eager path's NumPy view is of the same memory
    assert bn._shift_tensor[0] == 7.0


@pytest.mark.slow
def test_each_layer_object_uses_its_own_communicator() -> None:
    # one compiled function, two layers: the second must not run with the first's key
    a, b = (SyncBatchNorm(3, process_group=PartnerWithoutSamples()) for _ in range(2))
    call = torch.compile(lambda layer, x: layer(x), fullgraph=True)
    x = torch.randn(4, 3)
    call(a, x)
    call(b, x)
    call(b, x)
    assert (a.communicator.calls, b.communicator.calls) == (1, 2)
    assert (int(a.num_batches_tracked), int(b.num_batches_tracked)) == (1, 2)


@pytest.mark.slow
def test_compiled_forward_moves_the_shift() -> None:
    bn = SyncBatchNorm(3)
    x = torch.randn(8, 3) + 4
    torch.compile(bn, fullgraph=True)(x)
    torch.testing.assert_close(bn._shift_tensor, x.double().mean(0))
    assert torch.equal(torch.from_numpy(bn._shift), bn._shift_tensor)  # the eager path sees it


def test_registry_names_each_layer_once() -> None:
    bn = SyncBatchNorm(3, process_group="local")
    twin = copy.deepcopy(bn)
    assert twin._op_key != bn._op_key
    assert np.shares_memory(twin._shift, twin._shift_tensor.numpy())
    assert not np.shares_memory(twin._shift, bn._shift)
    assert _ops._communicator(twin._op_key) is twin.communicator
    assert _ops._communicator(bn._op_key) is bn.communicator
    key = bn._op_key
    del bn
    gc.collect()
    with pytest.raises(RuntimeError, match="expected the key of a live SyncBatchNorm layer"):
        _ops._communicator(key)


# --- several processes -----------------------------------------------------------------

RANKS = 2
TIMEOUT = 1500  # compiling on every rank of a busy 2-core machine
LINE = re.compile(r"^rank (\d+) case (\S+) (ok|FAIL)\b(.*)$", re.MULTILINE)
CASES = {"mpi": ["mpi"], "torch": ["shm", "torch"]}


def _check(job: Job, kind: str) -> None:
    assert job.returncode == 0, job.describe()
    results = {(int(r), case): (status, rest) for r, case, status, rest in LINE.findall(job.output)}
    for case in CASES[kind]:
        for rank in range(RANKS):
            status, rest = results.get((rank, case), ("missing", ""))
            assert status == "ok", f"rank {rank} case {case}: {status} {rest}\n" + job.describe(60)


@pytest.mark.launcher
@pytest.mark.slow
def test_compiled_under_mpiexec() -> None:
    _check(run_job([*mpiexec_command(RANKS), str(WORKER), "mpi"], TIMEOUT), "mpi")


@pytest.mark.launcher
@pytest.mark.slow
def test_compiled_under_torchrun() -> None:
    _check(run_job([*torchrun_command(RANKS), str(WORKER), "torch"], TIMEOUT), "torch")
