"""Model conversion: ``convert_sync_batchnorm`` (plain and fused) and ``revert_sync_batchnorm``.

In one process a synchronized layer is plain batch norm, so a converted
model, fused or not, must compute what the original computes: outputs,
input and parameter gradients, running statistics, step after step, in
training and in eval mode, with the same ``state_dict`` keys; and so must
the model reverted from it. Every fusion test counts the fused layers
(exactly), so a conversion that fuses nothing, or too much, fails; the cases
that must not fuse check that nothing did and that the model still computes
the same.
"""

from __future__ import annotations

import copy
import pickle
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import syncbn
from syncbn.comm import LocalCommunicator

C = 3
TOL64 = {"atol": 1e-10, "rtol": 1e-10}
Builder = Callable[[], nn.Module]


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


# ----------------------------------------------------------------------------- equivalence, fused


def fused_activations(model: nn.Module) -> list[tuple[str, float]]:
    """(activation, negative_slope) of every fused layer, synchronized or reverted."""
    return [
        (m.activation, m.negative_slope)
        for m in model.modules()
        if isinstance(m, (syncbn.SyncBatchNorm, syncbn.BatchNorm)) and m.activation is not None
    ]


def assert_same_model(model: nn.Module, ref: nn.Module, shape: tuple[int, ...], steps: int = 3) -> None:
    """Training steps (outputs, gradients of the input and of every parameter, an SGD
    step), then the running statistics, then an eval-mode forward: all as ``ref``'s."""
    assert list(model.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ref_params = dict(ref.named_parameters())
    opt_a = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    model.train()
    ref.train()
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
        outs, grads = [], []
        for m in (model, ref):
            xi = x.clone().requires_grad_()
            torch.manual_seed(step)  # the same dropout masks
            y = m(xi)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(step), dtype=y.dtype))
            outs.append(y)
            grads.append(xi.grad)
        _close(outs[0], outs[1], f"step {step}, output")
        _close(grads[0], grads[1], f"step {step}, input grad")
        for name, p in model.named_parameters():
            _close(p.grad, ref_params[name].grad, f"step {step}, grad of {name}")
        for opt in (opt_a, opt_b):
            opt.step()
            opt.zero_grad()
    ref_state = ref.state_dict()
    for name, value in model.state_dict().items():
        _close(value, ref_state[name], name)
    model.eval()
    ref.eval()
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        _close(model(x), ref(x), "eval output")


def _close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(actual, expected, **TOL64, msg=lambda s: f"{what}: {s}")


def check_fused(
    build: Builder, shape: tuple[int, ...], expected: list[tuple[str, float]], graph_module: bool
) -> nn.Module:
    """Convert a copy of ``build()`` with fuse=True: exactly ``expected`` fused, the same
    model as the original (trained side by side), and reverted, the same again."""
    torch.manual_seed(0)
    ref = _randomize(build()).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model fx can trace fuses without a word
        model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref), process_group="local", fuse=True)
    assert sorted(fused_activations(model)) == sorted(expected)
    assert isinstance(model, torch.fx.GraphModule) == graph_module
    if not graph_module:
        assert type(model) is type(ref)
    assert not any(type(m) is nn.modules.batchnorm.BatchNorm2d for m in model.modules())
    # revert before training: the reverted model starts from the same weights
    reverted = syncbn.revert_sync_batchnorm(copy.deepcopy(model))
    assert sorted(fused_activations(reverted)) == sorted(expected)
    assert not any(isinstance(m, syncbn.SyncBatchNorm) for m in reverted.modules())
    assert_same_model(model, ref, shape)
    torch.manual_seed(0)
    ref = _randomize(build()).double()
    assert_same_model(reverted, ref, shape)
    return model


RELU = ("relu", 0.01)
RELU6 = ("relu6", 0.01)
SILU = ("silu", 0.01)


class BasicBlock(nn.Module):
    """torchvision's BasicBlock with functional relu, and the shortcut computed after bn2."""

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != c:
            self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return F.relu(out)


class Bottleneck(nn.Module):
    """torchvision's Bottleneck, with three spellings of relu (functional, torch., in place)."""

    expansion = 4

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != c * 4:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, c * 4, 1, stride, bias=False), nn.BatchNorm2d(c * 4)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return out.relu_()


class ModuleReluBlock(BasicBlock):
    """torchvision's own spelling: one nn.ReLU module, called twice."""

    def __init__(self, cin: int, c: int, stride: int = 1) -> None:
        super().__init__(cin, c, stride)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: type[nn.Module], widths: tuple[int, ...] = (4, 8)) -> None:
        super().__init__()
        expansion = getattr(block, "expansion", 1)
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], 4
        for i, w in enumerate(widths):
            blocks.append(block(cin, w, 1 if i == 0 else 2))
            cin = w * expansion
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


IMAGES = (4, 3, 6, 6)


@pytest.mark.parametrize("block", [BasicBlock, ModuleReluBlock])
def test_fused_resnet_basic_blocks(block: type[nn.Module]) -> None:
    # stem, and bn1 and bn2 (with the residual) of both blocks; not the shortcut's batch norm
    model = check_fused(lambda: ResNet(block), IMAGES, [RELU] * 5, graph_module=True)
    assert len([m for m in model.modules() if isinstance(m, syncbn.SyncBatchNorm)]) == 6
    assert model.get_submodule("layers.1.downsample.1").activation is None
    assert type(model).__name__ == "ResNet"


def test_fused_resnet_bottlenecks() -> None:
    check_fused(lambda: ResNet(Bottleneck), IMAGES, [RELU] * 7, graph_module=True)


def test_fused_graph_module_copies_and_pickles() -> None:
    torch.manual_seed(0)
    model = syncbn.convert_sync_batchnorm(_randomize(ResNet(BasicBlock)), "local", fuse=True).eval()
    x = torch.randn(IMAGES)
    expected = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert list(clone.state_dict()) == list(model.state_dict())
        assert fused_activations(clone) == fused_activations(model)
        torch.testing.assert_close(clone(x), expected)


def test_fused_graph_module_keeps_unused_and_unpersisted_state() -> None:
    class WithExtras(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(C, C, 1)
            self.bn = nn.BatchNorm2d(C)
            self.unused = nn.Linear(2, 2)  # never called: a graph module alone would drop it
            self.register_buffer("scale", torch.full((1, C, 1, 1), 2.0), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(self.conv(x)) * self.scale)  # not fused: relu of a product

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = WithExtras()
            self.bn = nn.BatchNorm2d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.silu(self.bn(self.a(x)))

    model = check_fused(Net, (4, C, 3, 3), [SILU], graph_module=True)
    assert "a.scale" not in model.state_dict() and isinstance(model.a.unused, nn.Linear)
    # a traced-through module is a plain container now: its unfused forward cannot run by mistake
    with pytest.raises(NotImplementedError):
        model.a(torch.randn(2, C, 3, 3))


class Aliased(nn.Module):
    """``y += ...`` changes a tensor that another name holds too."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(C)
        self.bn2 = nn.BatchNorm2d(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x * 1.0
        alias = y
        y += self.bn(x)  # in place: alias sees it (and the layer's output is no residual here)
        return F.relu(self.bn2(y)) + alias


def test_augmented_assignment_stays_in_place() -> None:
    model = check_fused(Aliased, (4, C, 3, 3), [RELU], graph_module=True)
    assert "_iadd(" in model.code
    torch.manual_seed(0)
    ref = _randomize(Aliased()).double().eval()
    x = torch.randn(4, C, 3, 3, dtype=torch.float64)
    # the negative control: torch.fx alone records y + bn(x), out of place, and alias stays x
    assert not torch.allclose(torch.fx.symbolic_trace(ref)(x), ref(x))
    # a pickled graph module is traced again from its code: still in place
    model.eval()
    clone = pickle.loads(pickle.dumps(model))
    assert "_iadd(" in clone.code
    torch.testing.assert_close(clone(x), model(x), **TOL64)


def _conv_bn_act(cin: int, cout: int, stride: int = 1, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """torchvision's: Sequentials with nn.ReLU6, and a residual without activation."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [] if expand == 1 else [_conv_bn_act(cin, hidden, kernel=1)]
        layers += [
            _conv_bn_act(hidden, hidden, stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_act(3, 8),
            InvertedResidual(8, 8, 1, 1),
            InvertedResidual(8, 12, 2, 4),
            InvertedResidual(12, 12, 1, 4),
            _conv_bn_act(12, 32, kernel=1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def test_fused_mobilenet_v2_keeps_its_class() -> None:
    # every fusion is one of adjacent Sequential slots: fused in place, no graph module;
    # the projections' batch norms (a residual, no activation) stay unfused
    model = check_fused(MobileNetV2, (4, 3, 8, 8), [RELU6] * 7, graph_module=False)
    block = model.features[3].conv
    assert isinstance(block[0][2], nn.Identity) and block[0][1].activation == "relu6"
    assert type(block[3]) is syncbn.SyncBatchNorm and block[3].activation is None


def test_fused_sequential_activations() -> None:
    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.LeakyReLU(0.2),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4),
            nn.SiLU(),
            nn.Flatten(2),
            nn.BatchNorm1d(4),
            nn.Hardtanh(0.0, 6.0),
            nn.BatchNorm1d(4),
            nn.Hardtanh(-1.0, 1.0),  # not relu6: unfused
            nn.BatchNorm1d(4),
            nn.GELU(),  # not fusable
        )

    model = check_fused(build, (4, 3, 5, 5), [("leaky_relu", 0.2), SILU, RELU6], graph_module=False)
    assert [type(m).__name__ for m in model] == [
        "Conv2d",
        "SyncBatchNorm",
        "Identity",
        "Conv2d",
        "SyncBatchNorm",
        "Identity",
        "Flatten",
        "SyncBatchNorm",
        "Identity",
        "SyncBatchNorm",
        "Hardtanh",
        "SyncBatchNorm",
        "GELU",
    ]


class Functional(nn.Module):
    """``fn(bn(conv(x)), x)``: one pattern of layer output, residual and activation."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.bn = nn.BatchNorm2d(C)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> Any:
        return self.fn(self.bn(self.conv(x)), x)


def _iadd_relu(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    y += r
    return F.relu(y, inplace=True)


FUSED_PATTERNS: dict[str, tuple[Callable[[torch.Tensor, torch.Tensor], Any], tuple[str, float]]] = {
    "F.relu": (lambda y, r: F.relu(y), RELU),
    "F.relu inplace": (lambda y, r: F.relu(y, inplace=True), RELU),
    "torch.relu_": (lambda y, r: torch.relu_(y), RELU),
    "Tensor.relu": (lambda y, r: y.relu(), RELU),
    "F.relu6": (lambda y, r: F.relu6(y), RELU6),
    "F.hardtanh(0, 6)": (lambda y, r: F.hardtanh(y, 0.0, 6.0), RELU6),
    "F.hardtanh_ by keyword": (lambda y, r: F.hardtanh_(y, min_val=0, max_val=6), RELU6),
    "F.leaky_relu": (lambda y, r: F.leaky_relu(y, 0.2), ("leaky_relu", 0.2)),
    "F.leaky_relu default": (lambda y, r: F.leaky_relu(y), ("leaky_relu", 0.01)),
    "F.leaky_relu inplace": (
        lambda y, r: F.leaky_relu(y, negative_slope=0.3, inplace=True),
        ("leaky_relu", 0.3),
    ),
    "F.silu": (lambda y, r: F.silu(y), SILU),
    "relu(y + r)": (lambda y, r: F.relu(y + r), RELU),
    "relu(r + y)": (lambda y, r: F.relu(r + y), RELU),
    "y += r": (_iadd_relu, RELU),
    "torch.add": (lambda y, r: torch.relu(torch.add(y, r)), RELU),
    "Tensor.add": (lambda y, r: y.add(r).relu_(), RELU),
    "r.add(y)": (lambda y, r: F.relu6(r.add(y)), RELU6),
    "Tensor.add_": (lambda y, r: F.silu(y.add_(r)), SILU),
    "leaky_relu(y + r)": (lambda y, r: F.leaky_relu(y + r, 0.2), ("leaky_relu", 0.2)),
}


@pytest.mark.parametrize("name", list(FUSED_PATTERNS))
def test_fused_graph_pattern(name: str) -> None:
    fn, activation = FUSED_PATTERNS[name]
    check_fused(lambda: Functional(fn), (4, C, 3, 3), [activation], graph_module=True)


def _residual_into_copy(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    s = r * 1.0
    s += y  # in place on the residual's side: not the layer's output
    return F.relu(s)


def _add_used_twice(y: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    z = y + r
    return F.relu(z) + z


UNFUSED_PATTERNS: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "output used twice": lambda y, r: F.relu(y) + y,
    "no activation": lambda y, r: y + r,
    "activation of something else": lambda y, r: F.relu(y * 2),
    "activation of the residual": lambda y, r: F.relu(r) + y,
    "add with alpha": lambda y, r: F.relu(torch.add(y, r, alpha=2)),
    "y + y": lambda y, r: F.relu(y + y),
    "constant residual": lambda y, r: F.relu(y + 1.0),
    "sum used twice": _add_used_twice,
    "in place into the residual": _residual_into_copy,
    "gelu": lambda y, r: F.gelu(y),
    "hardtanh(-1, 1)": lambda y, r: F.hardtanh(y),
    "elu": lambda y, r: F.elu(y),
    "sigmoid method": lambda y, r: y.sigmoid(),
    "two outputs": lambda y, r: (F.relu(y), y),
}


@pytest.mark.parametrize("name", list(UNFUSED_PATTERNS))
def test_unfused_graph_pattern(name: str) -> None:
    fn = UNFUSED_PATTERNS[name]
    torch.manual_seed(0)
    ref = _randomize(Functional(fn)).double()
    model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref), "local", fuse=True)
    assert fused_activations(model) == []
    assert type(model) is Functional and type(model.bn) is syncbn.SyncBatchNorm
    x = torch.randn(4, C, 3, 3, dtype=torch.float64)
    for m in (model, ref):
        m.train()
    torch.testing.assert_close(model(x), ref(x), **TOL64)


def test_layer_called_twice_is_not_fused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(x)) + F.relu(self.bn(x * 2))

    model = syncbn.convert_sync_batchnorm(Twice(), "local", fuse=True)
    assert fused_activations(model) == [] and type(model) is Twice


def test_shared_layer_is_not_fused() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)
            self.alias = self.bn  # the same layer at two places: fusing one would change both
            self.seq = nn.Sequential(self.bn, nn.ReLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.alias(x))

    model = syncbn.convert_sync_batchnorm(Shared(), "local", fuse=True)
    assert fused_activations(model) == [] and type(model) is Shared
    assert model.bn is model.alias is model.seq[0]
    # the Sequential alone, with its layer shared: not fused either (by the Sequential rule)
    bn = nn.BatchNorm2d(C)
    seq = syncbn.convert_sync_batchnorm(nn.Sequential(bn, nn.ReLU(), bn, nn.ReLU()), "local", fuse=True)
    assert fused_activations(seq) == [] and seq[0] is seq[2]


def test_layer_or_activation_with_hooks_is_not_fused() -> None:
    model = nn.Sequential(nn.BatchNorm2d(C), nn.ReLU(), nn.BatchNorm2d(C), nn.ReLU())
    seen: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, args, out: seen.append(out))  # sees the layer's own output
    model[3].register_forward_pre_hook(lambda m, args: None)
    converted = syncbn.convert_sync_batchnorm(model, "local", fuse=True)
    assert fused_activations(converted) == []
    out = converted(torch.randn(4, C, 2, 2))
    assert len(seen) == 1 and (seen[0] < 0).any() and (out >= 0).all()


def test_untraceable_model_fuses_its_sequentials_only() -> None:
    class Taps(nn.Sequential):
        """A Sequential with its own forward: the layer's output is a tap."""

        def forward(self, x: torch.Tensor) -> Any:  # type: ignore[override]
            taps = []
            for m in self:
                x = m(x)
                taps.append(x)
            return taps

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(C, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
            self.taps = Taps(nn.BatchNorm2d(4), nn.ReLU())
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            if y.sum() > 0:  # data-dependent control flow: fx cannot trace it
                y = y * 2
            return F.relu(self.bn(y)) + sum(t.sum() for t in self.taps(y))

    torch.manual_seed(0)
    ref = _randomize(DataDependent()).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref), "local", fuse=True)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1, messages
    assert "DataDependent" in messages[0] and "cannot trace" in messages[0]
    assert "only batch norms directly followed by an activation in an nn.Sequential were fused" in messages[0]
    assert type(model) is DataDependent
    assert fused_activations(model) == [RELU]  # body's; not the functional relu, not the taps
    assert model.body[1].activation == "relu" and model.taps[0].activation is None
    assert_same_model(model, ref, (4, C, 3, 3))


def test_forward_that_depends_on_the_mode_is_not_traced() -> None:
    class Dropping(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(C)
            self.seq = nn.Sequential(nn.BatchNorm2d(C), nn.SiLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # a graph records one mode: traced in training, it would drop out in eval too
            return self.seq(F.dropout(F.relu(self.bn(x)), 0.5, self.training))

    torch.manual_seed(0)
    ref = _randomize(Dropping()).double()
    with pytest.warns(UserWarning, match="differs between training and eval mode"):
        model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref), "local", fuse=True)
    assert type(model) is Dropping and fused_activations(model) == [SILU]
    assert_same_model(model, ref, (4, C, 3, 3))


def test_module_with_hooks_is_not_traced() -> None:
    model = ResNet(BasicBlock)
    model.layers[0].register_forward_hook(lambda m, args, out: out * 2)
    with pytest.warns(UserWarning, match=r"BasicBlock has forward_hooks, which its graph would not run"):
        converted = syncbn.convert_sync_batchnorm(model, "local", fuse=True)
    assert type(converted) is ResNet and fused_activations(converted) == []


def test_module_overriding_train_is_not_traced() -> None:
    class FrozenStem(ResNet):
        def train(self, mode: bool = True) -> FrozenStem:
            super().train(mode)
            self.bn1.eval()  # a frozen batch norm: a graph module would lose this
            return self

    with pytest.warns(UserWarning, match="overrides train"):
        model = syncbn.convert_sync_batchnorm(FrozenStem(BasicBlock), "local", fuse=True)
    assert type(model) is FrozenStem
    model.train()
    assert not model.bn1.training


def test_fuse_after_a_plain_conversion() -> None:
    model = syncbn.convert_sync_batchnorm(ResNet(BasicBlock), "local")
    assert fused_activations(model) == []
    fused = syncbn.convert_sync_batchnorm(model, fuse=True)
    assert fused_activations(fused) == [RELU] * 5
    # already fused: nothing more to do
    again = syncbn.convert_sync_batchnorm(fused, fuse=True)
    assert fused_activations(again) == [RELU] * 5


def test_fuse_takes_a_bool() -> None:
    with pytest.raises(TypeError, match=r"fuse: expected True or False \(got 'yes'\)"):
        syncbn.convert_sync_batchnorm(_model(), fuse="yes")  # type: ignore[arg-type]


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
        converted = syncbn.convert_sync_batchnorm(model, subclasses={ScaledBN: "skip"}, fuse=True)
    assert converted[1] is scaled
    assert type(converted[0]) is syncbn.SyncBatchNorm and converted[0].activation is None
    # the skipped layer is not fused with its relu; the converted subclass is
    assert type(converted[2]) is nn.ReLU and converted[3].activation == "relu"


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

    model = syncbn.convert_sync_batchnorm(Block(), "local", fuse=True)
    assert type(model.bn) is syncbn.SyncBatchNorm
    assert (model.bn.activation, model.bn.negative_slope) == ("leaky_relu", 0.3)
    x = torch.randn(4, C, 3, dtype=torch.float64)
    torch.testing.assert_close(
        model(x),
        F.leaky_relu(F.batch_norm(x, None, None, ref.weight, ref.bias, True, 0.1, ref.eps) + x, 0.3),
        **TOL64,
    )
    assert list(model.state_dict()) == list(Block().state_dict())


# ----------------------------------------------------------------------------- two processes

_FUSED_WORKER = """
import copy, sys
import torch, torch.distributed as dist
sys.path.insert(0, "tests")
import syncbn
from test_convert import BasicBlock, ResNet, _randomize, fused_activations

dist.init_process_group("gloo")
rank, size = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
ref = _randomize(ResNet(BasicBlock)).double()
plain = copy.deepcopy(ref)
model = syncbn.convert_sync_batchnorm(copy.deepcopy(ref), fuse=True)
assert len(fused_activations(model)) == 5, fused_activations(model)
opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, ref)]
gen = torch.Generator().manual_seed(1)
rows = slice(rank * 3, rank * 3 + 3)
for step in range(2):
    x = torch.randn(3 * size, 3, 6, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(3 * size, 5, generator=gen, dtype=torch.float64)
    xs = x[rows].clone().requires_grad_()
    y = model(xs)
    y.backward(g[rows])
    xr = x.clone().requires_grad_()
    yr = ref(xr)
    yr.backward(g)
    torch.testing.assert_close(y, yr[rows], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(xs.grad, xr.grad[rows], atol=1e-9, rtol=1e-9)
    # the negative control: unsynchronized batch norm on the shard differs
    assert not torch.allclose(plain(x[rows]), yr[rows], atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        dist.all_reduce(p.grad)  # the sum over the shards is the whole batch's gradient
        torch.testing.assert_close(p.grad, q.grad, atol=1e-9, rtol=1e-9, msg=name)
    for opt in opts:
        opt.step()
        opt.zero_grad()
for (name, b), c in zip(model.named_buffers(), ref.buffers()):
    torch.testing.assert_close(b, c, atol=1e-9, rtol=1e-9, msg=name)
model.eval()
ref.eval()
x = torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64)
torch.testing.assert_close(model(x), ref(x), atol=1e-9, rtol=1e-9)
dist.destroy_process_group()
print(f"rank {rank}: FUSED OK", flush=True)
"""


@pytest.mark.launcher
def test_fused_resnet_in_two_processes(tmp_path: Any) -> None:
    # each rank trains the fused model on its shard; the layers' statistics are the
    # whole batch's, so outputs, gradients and running statistics are the reference's
    import launch

    script = tmp_path / "fused_worker.py"
    script.write_text(_FUSED_WORKER)
    job = launch.run_job([*launch.torchrun_command(2), str(script)], timeout=300)
    assert job.returncode == 0 and job.output.count("FUSED OK") == 2, job.describe()
