"""Model conversion: every batch-norm layer of a model to :class:`SyncBatchNorm`, and back.

With ``fuse=True`` the activation (and the residual add before it) that
follows a layer moves into the layer, wherever the model's structure proves
that this computes the same thing: adjacent slots of an ``nn.Sequential``,
or the graph that ``torch.fx`` traces. The rules, and what stays unfused,
are in docs/fusion.md.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node
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
# the handles that registered them still remove them), and a fused layer or
# activation must have none.
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
        self.mapped: set[int] = set()  # what the user's callables returned: left untraced by fx

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
                self.mapped.add(id(out))
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


def _synchronized(
    layer: _BatchNorm,
    process_group: CommSpec,
    activation: str | None,
    negative_slope: float,
    debug: bool = False,
) -> SyncBatchNorm:
    """A SyncBatchNorm with ``layer``'s configuration, parameters, buffers and hooks."""
    out = SyncBatchNorm(
        layer.num_features,
        layer.eps,
        layer.momentum,
        layer.affine,
        layer.track_running_stats,
        process_group,
        debug=debug,
        activation=activation,
        negative_slope=negative_slope,
    )
    _copy_state(layer, out)
    return out


def _to_sync(layer: _BatchNorm, process_group: CommSpec) -> SyncBatchNorm:
    # syncbn.BatchNorm keeps its activation
    if isinstance(layer, BatchNorm):
        return _synchronized(layer, process_group, layer.activation, layer.negative_slope)
    return _synchronized(layer, process_group, None, 0.01)


def convert_sync_batchnorm(
    module: nn.Module,
    process_group: CommSpec = None,
    *,
    fuse: bool = False,
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
        fuse: also move the activation (``nn.ReLU``, ``nn.ReLU6``,
            ``nn.LeakyReLU``, ``nn.SiLU``, ``nn.Hardtanh(0, 6)`` or their
            functional forms), and a residual add before it, into the layer
            that precedes it, where the model proves the pattern: in an
            ``nn.Sequential``, or in the graph ``torch.fx.symbolic_trace``
            records. A model fused through that graph comes back as a
            ``torch.fx.GraphModule`` with the same submodule names and
            ``state_dict`` keys; a model fx cannot trace faithfully is fused
            in its ``nn.Sequential`` containers only, with a warning saying
            why. See docs/fusion.md. Default: ``False``
        subclasses: ``{cls: rule}`` for batch-norm classes (matched exactly,
            not their subclasses): ``"skip"`` leaves their layers as they are,
            unsynchronized, with a warning; a callable
            ``fn(layer, process_group) -> torch.nn.Module`` returns each one's
            replacement. It takes precedence over the rules above.

    Returns:
        The converted module: ``module`` itself, changed in place, unless it
        is a batch-norm layer or ``fuse=True`` rewrote its graph (then a new
        ``torch.fx.GraphModule`` sharing its parameters: use the returned
        model).

    Example::

        >>> model = syncbn.convert_sync_batchnorm(model, fuse=True)
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse: expected True or False (got {fuse!r})")
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
    if not fuse or isinstance(out, _BatchNorm):
        return out
    return _fuse(out, converter.mapped)


# ----------------------------------------------------------------------------- revert


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`SyncBatchNorm` (ours or torch's) with plain batch norm.

    For single-process inference or export: every synchronized layer
    becomes a :class:`syncbn.BatchNorm` with the same activation (a fused
    layer stays fused) that shares its parameters, buffers and hooks and
    copies its training flag. It accepts every input rank the synchronized
    layer did, so the same model runs unchanged. A subclass with a forward
    of its own is left as it is, with a warning.

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


# ----------------------------------------------------------------------------- fusion: activations


class Activation(NamedTuple):
    """An activation as SyncBatchNorm's ``activation=`` and ``negative_slope=`` name it."""

    name: str
    negative_slope: float = 0.01


def _module_activation(module: nn.Module) -> Activation | None:
    """The activation an activation module computes, if it is one the layer can fuse."""
    if _hooks(module) or "forward" in vars(module):
        return None
    kind = type(module)  # exactly: a subclass may compute something else
    if kind is nn.ReLU:
        return Activation("relu")
    if kind in (nn.ReLU6, nn.Hardtanh) and _is_number(module.min_val, 0) and _is_number(module.max_val, 6):
        return Activation("relu6")
    if isinstance(module, nn.LeakyReLU) and kind is nn.LeakyReLU and _is_number(module.negative_slope):
        return Activation("leaky_relu", float(module.negative_slope))
    if kind is nn.SiLU:
        return Activation("silu")
    return None


def _is_number(value: object, equal_to: float | None = None) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return equal_to is None or value == equal_to


# Functions (and Tensor methods called as functions) that are an activation
# of their first argument: the name of what they compute, and the parameters
# after the input, in order, with their defaults. "hardtanh" is relu6 when
# its bounds are 0 and 6.
_INPLACE = ("inplace", False)
_HARDTANH = (("min_val", -1.0), ("max_val", 1.0))
_SLOPE = ("negative_slope", 0.01)
_FUNCTIONS: dict[Any, tuple[str, tuple[tuple[str, Any], ...]]] = {
    F.relu: ("relu", (_INPLACE,)),
    torch.relu: ("relu", ()),
    torch.relu_: ("relu", ()),  # also F.relu_
    torch.Tensor.relu: ("relu", ()),
    torch.Tensor.relu_: ("relu", ()),
    F.relu6: ("relu6", (_INPLACE,)),
    torch._C._nn.relu6: ("relu6", ()),
    torch._C._nn.relu6_: ("relu6", ()),
    F.hardtanh: ("hardtanh", (*_HARDTANH, _INPLACE)),
    torch._C._nn.hardtanh: ("hardtanh", _HARDTANH),
    torch._C._nn.hardtanh_: ("hardtanh", _HARDTANH),  # also F.hardtanh_
    F.leaky_relu: ("leaky_relu", (_SLOPE, _INPLACE)),
    torch._C._nn.leaky_relu: ("leaky_relu", (_SLOPE,)),
    torch._C._nn.leaky_relu_: ("leaky_relu", (_SLOPE,)),  # also F.leaky_relu_
    F.silu: ("silu", (_INPLACE,)),
    torch._C._nn.silu: ("silu", ()),
    torch._C._nn.silu_: ("silu", ()),
}
_METHODS = {"relu": ("relu", ()), "relu_": ("relu", ())}


def _bind(node: Node, params: tuple[tuple[str, Any], ...]) -> dict[str, Any] | None:
    """The arguments after the input of a call, by name with defaults; None if
    they are not the expected ones, or any is computed in the graph."""
    rest = node.args[1:]
    if len(rest) > len(params) or not set(node.kwargs) <= {name for name, _ in params[len(rest) :]}:
        return None
    values = dict(params)
    values.update(zip((name for name, _ in params), rest))
    values.update(node.kwargs)
    if any(isinstance(v, Node) for v in values.values()):
        return None
    return values


def _node_activation(node: Node, src: Node, root: nn.Module) -> Activation | None:
    """The activation ``node`` applies to ``src`` alone, if it is one the layer can fuse."""
    if not node.args or node.args[0] is not src:
        return None
    if any(a is src for a in node.args[1:]) or any(v is src for v in node.kwargs.values()):
        return None
    if node.op == "call_module":
        if len(node.args) != 1 or node.kwargs:
            return None
        return _module_activation(root.get_submodule(str(node.target)))
    if node.op == "call_function" and node.target in _FUNCTIONS:
        name, params = _FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _METHODS:
        name, params = _METHODS[str(node.target)]
    else:
        return None
    values = _bind(node, params)
    if values is None or not isinstance(values.get("inplace", False), bool):
        return None
    if name == "hardtanh":
        ok = _is_number(values["min_val"], 0) and _is_number(values["max_val"], 6)
        return Activation("relu6") if ok else None
    if name == "leaky_relu":
        slope = values["negative_slope"]
        return Activation("leaky_relu", float(slope)) if _is_number(slope) else None
    return Activation(name)


def _augmented(name: str) -> Callable[[Any, Any], Any]:
    op = getattr(operator, name)

    def call(a: Any, b: Any) -> Any:
        return op(a, b)  # in place if ``a`` is mutable (a tensor), like ``a op= b``; rebinds nothing

    call.__name__ = call.__qualname__ = f"_{name}"
    call.__module__ = __name__
    call.__doc__ = f"``a {name[1:]}= b`` as a call, which the graph keeps (see _Proxy)."
    return call


# Python's augmented assignments, ``out += identity`` first among them. torch.fx's
# proxies have no __iadd__, so Python falls back to ``out = out + identity``: the
# graph would add out of place, and a tensor that ``out`` aliases (the model's
# input, a view) would no longer change. The tracer records these functions instead
# (module globals, so a pickled graph module finds them again).
_ARITHMETIC = ("iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul")
_BITWISE = ("iand", "ior", "ixor", "ilshift", "irshift")
_AUGMENTED = {name: _augmented(name) for name in (*_ARITHMETIC, *_BITWISE)}
globals().update({f.__name__: f for f in _AUGMENTED.values()})


# The residual adds: function or method -> whether it adds in place into its
# first operand (then that operand must be the layer's output, whose only
# user it is: nothing else sees the change).
_ADD_FUNCTIONS: dict[Any, bool] = {
    operator.add: False,
    operator.iadd: True,
    _AUGMENTED["iadd"]: True,  # out += identity
    torch.add: False,
    torch.Tensor.add: False,
    torch.Tensor.add_: True,
}
_ADD_METHODS = {"add": False, "add_": True}


def _residual_of(add: Node, bn: Node) -> Node | None:
    """If ``add`` is ``bn + residual`` (or ``residual + bn``), the residual."""
    if add.op == "call_function" and add.target in _ADD_FUNCTIONS:
        in_place = _ADD_FUNCTIONS[add.target]
    elif add.op == "call_method" and add.target in _ADD_METHODS:
        in_place = _ADD_METHODS[str(add.target)]
    else:
        return None
    if add.kwargs or len(add.args) != 2:  # alpha=, out=, or the deprecated add(a, alpha, b)
        return None
    a, b = add.args
    if a is bn and b is not bn:
        other = b
    elif b is bn and a is not bn and not in_place:
        other = a
    else:
        return None
    # a tensor the graph computes (a constant or parameter is no batch-shaped residual)
    if not isinstance(other, Node) or other.op == "get_attr":
        return None
    return other


# ----------------------------------------------------------------------------- fusion: the passes


def _occurrences(model: nn.Module) -> Counter[int]:
    """How many places each module object has in ``model``."""
    return Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))


def _fusable(layer: nn.Module | None, occurrences: Counter[int]) -> bool:
    """A synchronized layer with nothing after it yet, which fusing changes nowhere else."""
    return (
        type(layer) is SyncBatchNorm
        and _known_forward(layer) == _OURS_SYNC
        and layer.activation is None
        and not _hooks(layer)
        and occurrences[id(layer)] == 1
    )


def _fused(layer: SyncBatchNorm, activation: Activation) -> SyncBatchNorm:
    return _synchronized(
        layer, layer.process_group, activation.name, activation.negative_slope, debug=layer.debug
    )


def _plain_sequential(module: nn.Module) -> bool:
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and "forward" not in vars(module)
    )


def _fuse_sequentials(model: nn.Module) -> int:
    """Fuse every synchronized layer directly followed by an activation in an
    nn.Sequential; the activation's slot becomes nn.Identity. Returns how many."""
    occurrences = _occurrences(model)
    fused = 0
    for seq in [m for m in model.modules() if _plain_sequential(m)]:
        names = [name for name, m in seq._modules.items() if m is not None]
        i = 0
        while i + 1 < len(names):
            layer, after = seq._modules[names[i]], seq._modules[names[i + 1]]
            activation = _module_activation(after) if after is not None else None
            if isinstance(layer, SyncBatchNorm) and _fusable(layer, occurrences) and activation is not None:
                seq.add_module(names[i], _fused(layer, activation))
                seq.add_module(names[i + 1], nn.Identity())
                fused += 1
                i += 2
            else:
                i += 1
    return fused


class _Fusion(NamedTuple):
    """``act(bn(x))`` or ``act(bn(x) + residual)`` in a graph."""

    bn: Node
    add: Node | None
    act: Node
    activation: Activation


class _Proxy(torch.fx.Proxy):
    """A proxy whose augmented assignments are recorded as such."""


for _name, _function in _AUGMENTED.items():
    setattr(
        _Proxy,
        f"__{_name}__",
        lambda self, other, function=_function: self.tracer.create_proxy(
            "call_function", function, (self, other), {}
        ),
    )


class _Tracer(torch.fx.Tracer):
    """torch.fx's tracer with every batch-norm layer (and whatever a user's
    ``subclasses=`` callable returned) a leaf, and augmented assignments kept;
    records the modules it traces through, whose forward the graph replaces.
    (Also the tracer a pickled graph module is traced again with.)"""

    def __init__(self, leaves: frozenset[int] | set[int] = frozenset()) -> None:
        super().__init__(autowrap_functions=tuple(_AUGMENTED.values()))
        self.leaves = leaves
        self.traced: dict[int, nn.Module] = {}

    def proxy(self, node: Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            isinstance(m, _BatchNorm)
            or id(m) in self.leaves
            or super().is_leaf_module(m, module_qualified_name)
        )

    def call_module(
        self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if not self.is_leaf_module(m, self.path_of_module(m)):
            self.traced[id(m)] = m
        return super().call_module(m, forward, args, kwargs)


class _Traced(NamedTuple):
    graph: Graph
    traced: dict[int, nn.Module]  # the modules traced through, root included
    constants: dict[str, Any]  # tensors the tracer stowed on the root


class _NotTraceableError(Exception):
    """Why a model's graph cannot stand in for it."""


# Methods whose override in a traced-through module the graph module would
# lose: training mode, device moves, checkpoints.
_STATE_METHODS = (
    "train",
    "_apply",
    "state_dict",
    "load_state_dict",
    "_save_to_state_dict",
    "_load_from_state_dict",
)


def _trace(root: nn.Module, leaves: set[int]) -> _Traced:
    """The graph of ``root``'s forward, once in training mode and once in eval
    mode: the graph records one path through the forward's Python control
    flow, so the two must agree for it to stand in for the model."""
    flags = [(m, m.training) for m in root.modules()]
    before = set(vars(root))
    runs: list[_Traced] = []
    try:
        for mode in (True, False):
            for m, _ in flags:  # the flags alone: a train() override is not ours to call
                m.training = mode
            tracer = _Tracer(leaves)
            try:
                graph = tracer.trace(root)
            except Exception as e:  # whatever the forward raises on proxies: not traceable
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise _NotTraceableError(
                    f"torch.fx cannot trace it ({type(e).__name__}: {first[:200]})"
                ) from e
            finally:
                constants = {k: vars(root).pop(k) for k in set(vars(root)) - before}
            runs.append(_Traced(graph, {id(root): root, **tracer.traced}, constants))
    finally:
        for m, flag in flags:
            m.training = flag
    train, eval_ = runs
    if train.graph.python_code("self").src != eval_.graph.python_code("self").src:
        raise _NotTraceableError(
            "its forward differs between training and eval mode, and a graph records one"
        )
    for m in train.traced.values():
        hooks = _hooks(m)
        if hooks:
            raise _NotTraceableError(
                f"{_class_name(m)} has {', '.join(hooks)}, which its graph would not run"
            )
        overrides = [
            name for name in _STATE_METHODS if getattr(type(m), name) is not getattr(nn.Module, name)
        ]
        if overrides:
            raise _NotTraceableError(
                f"{_class_name(m)} overrides {', '.join(overrides)}, which its graph would lose"
            )
    return train


def _mirror(src: nn.Module, dst: nn.Module, traced: dict[int, nn.Module], made: dict[int, nn.Module]) -> None:
    """Give ``dst`` ``src``'s parameters, buffers (persistent or not), tensor
    attributes and children, in order; a traced-through child becomes a plain
    nn.Module mirroring it, as its forward is in the graph now (calling it
    alone raises instead of running the unfused code)."""
    dst.training = src.training
    for name, p in src._parameters.items():
        dst.register_parameter(name, p)
    for name, b in src._buffers.items():
        dst.register_buffer(name, b, persistent=name not in src._non_persistent_buffers_set)
    for name, value in vars(src).items():
        if isinstance(value, torch.Tensor):  # what the graph reads as a constant (get_attr)
            vars(dst)[name] = value
    for name, child in src._modules.items():
        if child is not None and id(child) in traced:
            if id(child) not in made:
                made[id(child)] = nn.Module()
                _mirror(child, made[id(child)], traced, made)
            child = made[id(child)]
        dst.add_module(name, child)


def _find_fusions(graph: Graph, root: nn.Module) -> list[_Fusion]:
    occurrences = _occurrences(root)
    modules = {str(n.target): root.get_submodule(str(n.target)) for n in graph.nodes if n.op == "call_module"}
    calls = Counter(id(modules[str(n.target)]) for n in graph.nodes if n.op == "call_module")
    found = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        layer = modules[str(node.target)]
        if not _fusable(layer, occurrences) or calls[id(layer)] != 1:
            continue
        if len(node.args) != 1 or node.kwargs or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        add = user if _residual_of(user, node) is not None else None
        if add is not None:
            if len(add.users) != 1:
                continue
            act = next(iter(add.users))
        else:
            act = user
        activation = _node_activation(act, add if add is not None else node, root)
        if activation is not None:
            found.append(_Fusion(node, add, act, activation))
    # Where two layers' outputs are added (a block's last layer and its
    # shortcut's), either could take the other as its residual: the first
    # operand's takes it (``out + identity``, ``out += identity``).
    second = [f for f in found if f.add is not None and f.add.args[0] is not f.bn]
    taken = {f.act for f in found if f not in second}
    return [f for f in found if f not in second or f.act not in taken]


def _in_sequence(
    fusion: _Fusion, root: nn.Module, traced: dict[int, nn.Module]
) -> tuple[nn.Module, str, str] | None:
    """The Sequential, layer slot and activation slot, if ``fusion`` is a layer
    followed by a module activation in adjacent slots of a Sequential whose
    forward the graph traced, the activation called nowhere else."""
    if fusion.add is not None or fusion.act.op != "call_module":
        return None
    parent, _, name = str(fusion.bn.target).rpartition(".")
    act_parent, _, act_name = str(fusion.act.target).rpartition(".")
    seq = root.get_submodule(parent)
    if act_parent != parent or not _plain_sequential(seq) or id(seq) not in traced:
        return None
    act = seq._modules[act_name]
    act_calls = sum(
        1
        for n in fusion.act.graph.nodes
        if n.op == "call_module" and root.get_submodule(str(n.target)) is act
    )
    names = [n for n, m in seq._modules.items() if m is not None]
    if act_calls != 1 or names.index(act_name) != names.index(name) + 1:
        return None
    return seq, name, act_name


def _rewrite(graph: Graph, fusions: list[_Fusion]) -> None:
    """Each fusion's layer call takes the residual; its add and activation go."""
    for node in graph.nodes:
        if isinstance(node.type, str):
            # an annotation under `from __future__ import annotations`: kept as
            # a string, it would stop the graph module from pickling
            node.type = None
    for f in fusions:
        if f.add is None:
            f.act.replace_all_uses_with(f.bn)
            graph.erase_node(f.act)
            continue
        # read now: an earlier rewrite may have replaced the residual's node
        residual = f.add.args[1] if f.add.args[0] is f.bn else f.add.args[0]
        # at the add: after both the layer's input and the residual (computed after the layer, maybe)
        with graph.inserting_before(f.add):
            call = graph.call_module(str(f.bn.target), (f.bn.args[0], residual))
        f.act.replace_all_uses_with(call)
        for node in (f.act, f.add, f.bn):
            graph.erase_node(node)
    graph.lint()


def _fuse(model: nn.Module, leaves: set[int]) -> nn.Module:
    """The fusion passes of convert_sync_batchnorm(fuse=True) on a converted model."""
    try:
        traced = _trace(model, leaves)
        gm = GraphModule(nn.Module(), Graph(), type(model).__name__)
        _mirror(model, gm, traced.traced, {id(model): gm})
        for name, value in traced.constants.items():
            vars(gm)[name] = value
        if list(gm.state_dict(keep_vars=True)) != list(model.state_dict(keep_vars=True)):
            raise _NotTraceableError("its graph module would not have the same state_dict keys")
    except _NotTraceableError as why:
        warnings.warn(
            f"convert_sync_batchnorm(fuse=True): {_class_name(model)}: {why}; only batch norms directly "
            "followed by an activation in an nn.Sequential were fused",
            UserWarning,
            stacklevel=3,
        )
        _fuse_sequentials(model)
        return model
    fusions = _find_fusions(traced.graph, model)
    slots = [_in_sequence(f, model, traced.traced) for f in fusions]
    if all(slot is not None for slot in slots):
        # nothing the Sequentials cannot say: the model keeps its own classes
        for f, slot in zip(fusions, slots):
            assert slot is not None
            seq, name, act_name = slot
            layer = seq._modules[name]
            assert isinstance(layer, SyncBatchNorm)
            seq.add_module(name, _fused(layer, f.activation))
            seq.add_module(act_name, nn.Identity())
        return model
    _rewrite(traced.graph, fusions)
    for f in fusions:
        target = str(f.bn.target)
        parent, _, name = target.rpartition(".")
        layer = gm.get_submodule(target)
        assert isinstance(layer, SyncBatchNorm)
        gm.get_submodule(parent).add_module(name, _fused(layer, f.activation))
    gm.graph = traced.graph  # generates forward
    gm._tracer_cls = _Tracer  # unpickled, the code is traced again: with augmented assignments kept
    return gm
