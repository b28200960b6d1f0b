"""Model conversion: ``convert_sync_batchnorm`` and ``revert_sync_batchnorm``.

In one process a synchronized layer is plain batch norm, so a converted
model must compute what the original computes, with the same parameters and
``state_dict`` keys; a layer whose class computes something else is refused
(or left alone, or mapped, as ``subclasses=`` says), before anything changes.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncbn
from syncbn.comm import LocalCommunicator

C = 3
TOL64 = {"atol": 1e-10, "rtol": 1e-10}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch-norm weights and biases away from 1 and 0 (a dropped or swapped one shows)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return model


# ----------------------------------------------------------------------------- plain conversion


def _model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(C, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=0.3, eps=1e-3),
        nn.Sequential(
            nn.ReLU(),
            nn.InstanceNorm2d(4, affine=True),
            nn.GroupNorm(2, 4),
            nn.SyncBatchNorm(4),
            nn.Sequential(nn.BatchNorm2d(4, affine=False, track_running_stats=False)),
        ),
        nn.Flatten(2),
        nn.BatchNorm1d(4),
        nn.LayerNorm(16),
    )


def test_convert_sync_batchnorm() -> None:
    torch.manual_seed(0)
    model = _model()
    model[2][3].eval()  # a training flag that differs from its parent's
    before = dict(model.named_modules())
    comm = LocalCommunicator()
    converted = syncbn.convert_sync_batchnorm(model, process_group=comm)
    assert converted is model
    after = dict(converted.named_modules())
    assert list(after) == list(before)
    bn_names = ["1", "2.3", "2.4.0", "4"]
    for name, old in before.items():
        new = after[name]
        if name in bn_names:
            assert type(new) is syncbn.SyncBatchNorm, name
            assert new.activation is None, name
            for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
                assert getattr(new, attr) == getattr(old, attr), (name, attr)
            for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                assert getattr(new, attr) is getattr(old, attr), (name, attr)
            assert new.process_group is comm and new.communicator is comm
        elif name:
            assert new is old, f"{name} ({type(old).__name__}) must be left alone"
    assert not after["2.3"].training and after["1"].training
    assert isinstance(after["2.1"], nn.InstanceNorm2d) and isinstance(after["2.2"], nn.GroupNorm)
    # the converted model's parameters are the original ones (an optimizer keeps working)
    assert [id(p) for p in converted.parameters()] == [id(p) for p in before[""].parameters()]


def test_convert_single_layer_and_classmethod() -> None:
    bn = nn.BatchNorm3d(C, momentum=None)
    out = syncbn.SyncBatchNorm.convert_sync_batchnorm(bn, process_group="local")
    assert type(out) is syncbn.SyncBatchNorm and out is not bn
    assert out.weight is bn.weight and out.momentum is None
    assert isinstance(out.communicator, LocalCommunicator)
    ours = syncbn.SyncBatchNorm(C)
    assert syncbn.convert_sync_batchnorm(ours) is ours


def test_converted_model_matches_original_in_one_process() -> None:
    torch.manual_seed(0)
    ref = _model().double()
    model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref))
    for _ in range(2):
        x = torch.randn(3, C, 4, 4, dtype=torch.float64)
        ya, yb = model(x), ref(x)
        torch.testing.assert_close(ya, yb, **TOL64)
        ya.sum().backward()
        yb.sum().backward()
    for (name, pa), pb in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, **TOL64, msg=name)
    for (name, ba), bb in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(ba, bb, **TOL64, msg=name)


def test_shared_layer_stays_shared() -> None:
    bn = nn.BatchNorm2d(C)
    model = nn.Sequential(bn, nn.Conv2d(C, C, 1), bn)
    converted = syncbn.convert_sync_batchnorm(model)
    assert type(converted[0]) is syncbn.SyncBatchNorm and converted[0] is converted[2]
    assert list(converted.state_dict()) == list(nn.Sequential(bn, nn.Conv2d(C, C, 1), bn).state_dict())


def test_lazy_layer_must_be_initialized_first() -> None:
    model = nn.Sequential(nn.Conv2d(C, 4, 1), nn.LazyBatchNorm2d())
    with pytest.raises(
        ValueError,
        match=r"'1' \(torch\.nn\.modules\.batchnorm\.LazyBatchNorm2d\) is not "
        r"initialized.*forward pass",
    ):
        syncbn.convert_sync_batchnorm(model)
    assert type(model[1]) is nn.LazyBatchNorm2d  # left unchanged
    model(torch.randn(2, C, 4, 4))  # the lazy layer becomes a BatchNorm2d of 4 channels
    converted = syncbn.convert_sync_batchnorm(model)
    assert type(converted[1]) is syncbn.SyncBatchNorm and converted[1].num_features == 4


def test_hooks_move_with_the_layer() -> None:
    seen: list[str] = []
    bn = nn.BatchNorm2d(C)
    handle = bn.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    converted = syncbn.convert_sync_batchnorm(nn.Sequential(bn))
    converted(torch.randn(2, C, 2, 2))
    assert seen == ["SyncBatchNorm"]
    reverted = syncbn.revert_sync_batchnorm(converted)
    reverted(torch.randn(2, C, 2, 2))
    assert seen == ["SyncBatchNorm", "BatchNorm"]
    handle.remove()  # the handle still reaches the hook: the same registry
    reverted(torch.randn(2, C, 2, 2))
    assert len(seen) == 2


# ----------------------------------------------------------------------------- revert


def test_revert_sync_batchnorm() -> None:
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(_model().double())
    model(torch.randn(4, C, 4, 4, dtype=torch.float64))  # non-trivial running stats
    model.eval()
    x = torch.randn(2, C, 4, 4, dtype=torch.float64)
    expected = model(x)
    before = dict(model.named_modules())
    reverted = syncbn.revert_sync_batchnorm(model)
    for name, new in reverted.named_modules():
        assert not isinstance(new, (syncbn.SyncBatchNorm, nn.SyncBatchNorm)), name
        old = before[name]
        if isinstance(old, syncbn.SyncBatchNorm):
            assert isinstance(new, nn.modules.batchnorm._BatchNorm)
            for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                assert getattr(new, attr) is getattr(old, attr), (name, attr)
            assert new.training == old.training
            assert (new.eps, new.momentum, new.affine) == (old.eps, old.momentum, old.affine)
    torch.testing.assert_close(reverted(x), expected, **TOL64)


def test_reverted_layer_is_the_public_batchnorm_class() -> None:
    reverted = syncbn.revert_sync_batchnorm(nn.Sequential(syncbn.SyncBatchNorm(C)))
    layer = reverted[0]
    assert type(layer) is syncbn.BatchNorm
    assert repr(reverted).count("BatchNorm(") == 1 and "_" not in type(layer).__qualname__
    # a pickle names the public class, and loads back into it
    data = pickle.dumps(reverted)
    assert b"syncbn.module" in data and b"BatchNorm" in data
    loaded = pickle.loads(data)
    assert type(loaded[0]) is syncbn.BatchNorm
    assert loaded.state_dict().keys() == nn.Sequential(nn.BatchNorm2d(C)).state_dict().keys()


@pytest.mark.parametrize("layer", [syncbn.SyncBatchNorm(C), nn.SyncBatchNorm(C)], ids=["syncbn", "torch"])
def test_reverted_layer_takes_any_rank(layer: nn.Module) -> None:
    with torch.no_grad():
        layer.running_mean.uniform_()
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_()
    layer.eval()
    reverted = syncbn.revert_sync_batchnorm(layer)
    assert reverted is not layer and not isinstance(reverted, nn.SyncBatchNorm)
    for shape in [(4, C), (4, C, 5), (4, C, 5, 6), (2, C, 2, 3, 4)]:
        x = torch.randn(shape)
        expected = nn.functional.batch_norm(
            x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps
        )
        torch.testing.assert_close(reverted(x), expected)
        if isinstance(layer, syncbn.SyncBatchNorm):
            torch.testing.assert_close(layer(x), expected)
    # train mode works too after revert (single process, plain batch norm)
    reverted.train()
    assert reverted(torch.randn(3, C, 2, 2, 2)).shape == (3, C, 2, 2, 2)


def test_revert_leaves_a_subclass_with_its_own_forward() -> None:
    class Halved(syncbn.SyncBatchNorm):
        def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
            return super().forward(input, residual) / 2

    model = nn.Sequential(Halved(C), syncbn.SyncBatchNorm(C))
    with pytest.warns(UserWarning, match=r"left 1 layer\(s\) synchronized.*'0' \(.*Halved\)"):
        reverted = syncbn.revert_sync_batchnorm(model)
    assert type(reverted[0]) is Halved and type(reverted[1]) is syncbn.BatchNorm


# ----------------------------------------------------------------------------- subclasses


class ScaledBN(nn.BatchNorm2d):
    """A batch norm that computes something else: its own forward."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input) * 2


class CheckedBN(nn.BatchNorm2d):
    """A subclass with torch's forward (only its input check is its own)."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() != 4:
            raise ValueError("4D only")


class Doubled(nn.Module):
    """What a user maps ScaledBN to: a synchronized layer, then the factor 2."""

    def __init__(self, bn: nn.BatchNorm2d, process_group: Any) -> None:
        super().__init__()
        plain = nn.BatchNorm2d(bn.num_features, dtype=bn.weight.dtype)
        self.bn = syncbn.convert_sync_batchnorm(plain, process_group)
        self.bn.load_state_dict(bn.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * 2


def _mixed() -> nn.Sequential:
    return nn.Sequential(nn.BatchNorm2d(C), ScaledBN(C), nn.ReLU(), CheckedBN(C), nn.ReLU())


def test_subclass_with_its_own_forward_is_refused() -> None:
    model = _mixed()
    with pytest.raises(
        TypeError,
        match=r"(?s)cannot convert '1' \(.*test_convert\.ScaledBN\): its class "
        r"overrides forward.*\{ScaledBN: 'skip'\}.*\{ScaledBN: fn\}",
    ):
        syncbn.convert_sync_batchnorm(model)
    # refused before anything changed
    assert [type(m) for m in model] == [nn.BatchNorm2d, ScaledBN, nn.ReLU, CheckedBN, nn.ReLU]


def test_subclass_with_torch_forward_converts() -> None:
    model = syncbn.convert_sync_batchnorm(nn.Sequential(CheckedBN(C)))
    assert type(model[0]) is syncbn.SyncBatchNorm


def test_replaced_forward_is_refused() -> None:
    bn = nn.BatchNorm2d(C)
    bn.forward = lambda x: x  # type: ignore[method-assign]
    with pytest.raises(TypeError, match="this layer's forward was replaced"):
        syncbn.convert_sync_batchnorm(nn.Sequential(bn))


def test_torch_syncbatchnorm_subclass_with_its_own_forward_is_refused() -> None:
    class Clamped(nn.SyncBatchNorm):
        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return super().forward(input).clamp(-1, 1)

    with pytest.raises(TypeError, match="Clamped"):
        syncbn.convert_sync_batchnorm(nn.Sequential(Clamped(C)))


def test_subclass_skipped() -> None:
    torch.manual_seed(0)
    model = _mixed()
    scaled = model[1]
    with pytest.warns(UserWarning, match=r"left 1 batch-norm layer\(s\) unsynchronized.*'1' \(.*ScaledBN\)"):
        converted = syncbn.convert_sync_batchnorm(model, subclasses={ScaledBN: "skip"})
    assert converted[1] is scaled
    assert type(converted[0]) is syncbn.SyncBatchNorm and type(converted[3]) is syncbn.SyncBatchNorm


def test_subclass_mapped_by_a_callable() -> None:
    torch.manual_seed(0)
    ref = _randomize(_mixed()).double()
    calls: list[tuple[nn.Module, Any]] = []

    def to_doubled(bn: nn.BatchNorm2d, process_group: Any) -> nn.Module:
        calls.append((bn, process_group))
        return Doubled(bn, process_group)

    model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref), "local", subclasses={ScaledBN: to_doubled})
    assert len(calls) == 1 and type(calls[0][0]) is ScaledBN and calls[0][1] == "local"
    assert type(model[1]) is Doubled and type(model[1].bn) is syncbn.SyncBatchNorm
    x = torch.randn(4, C, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), **TOL64)


def test_mapping_takes_precedence_and_matches_the_exact_class() -> None:
    class ScaledAgain(ScaledBN):
        pass

    model = nn.Sequential(nn.BatchNorm1d(C), nn.BatchNorm2d(C))
    with pytest.warns(UserWarning, match="unsynchronized"):
        syncbn.convert_sync_batchnorm(model, subclasses={nn.BatchNorm1d: "skip"})
    assert type(model[0]) is nn.BatchNorm1d and type(model[1]) is syncbn.SyncBatchNorm
    # a subclass of a mapped class needs its own entry
    with pytest.raises(TypeError, match="ScaledAgain"):
        syncbn.convert_sync_batchnorm(nn.Sequential(ScaledAgain(C)), subclasses={ScaledBN: "skip"})


@pytest.mark.parametrize(
    "subclasses, error, match",
    [
        ([ScaledBN], TypeError, r"subclasses: expected a dict .*\(got list\)"),
        ({"ScaledBN": "skip"}, TypeError, r"expected batch-norm classes as keys .*\(got 'ScaledBN'\)"),
        ({nn.LayerNorm: "skip"}, TypeError, r"expected batch-norm classes as keys"),
        (
            {ScaledBN: "skp"},
            ValueError,
            r"subclasses\[ScaledBN\]: expected 'skip' or a callable .*\(got 'skp'\)",
        ),
        (
            {ScaledBN: None},
            TypeError,
            r"subclasses\[ScaledBN\]: expected 'skip' or a callable .*\(got None\)",
        ),
        (
            {ScaledBN: lambda bn, pg: "not a module"},
            TypeError,
            r"subclasses\[ScaledBN\] returned str for '1' .*\(expected a torch\.nn\.Module\)",
        ),
    ],
    ids=["list", "name", "not a batch norm", "misspelt", "None", "returns a string"],
)
def test_subclasses_are_validated(subclasses: Any, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        syncbn.convert_sync_batchnorm(_mixed(), subclasses=subclasses)


def test_syncbn_batchnorm_keeps_its_activation() -> None:
    torch.manual_seed(0)
    ref = syncbn.BatchNorm(C, activation="leaky_relu", negative_slope=0.3).double()
    _randomize(ref)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = copy.deepcopy(ref)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(x, x)

    model = syncbn.convert_sync_batchnorm(Block(), "local")
    assert type(model.bn) is syncbn.SyncBatchNorm
    assert (model.bn.activation, model.bn.negative_slope) == ("leaky_relu", 0.3)
    x = torch.randn(4, C, 3, dtype=torch.float64)
    torch.testing.assert_close(
        model(x),
        F.leaky_relu(F.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.1, ref.eps) + x, 0.3),
        **TOL64,
    )
    assert list(model.state_dict()) == list(Block().state_dict())
