"""``SyncBatchNorm``: the module that decides; ``function.py`` computes."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import _ops
from ._activation import KERNEL_ACTIVATIONS, apply_activation, check_activation, check_residual
from ._debug import LayerCheck
from ._environment import switched_on
from ._views import LayerArrays
from .comm import CommSpec, Communicator, LocalCommunicator, get_communicator
from .function import LayerArgs, needs_grad, normalize_with_running_stats, sync_batch_norm

__all__ = ["BatchNorm", "SyncBatchNorm"]


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization with statistics over the whole distributed batch, on CPU.

    .. math::

        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} * \gamma + \beta

    In training, the per-channel mean and biased variance are those of the
    global batch: the union of every rank's input, whatever its size. Each
    forward issues one allreduce of ``2C + 1`` float64 values
    (``[sum(x - s), sum((x - s)^2), count]`` with a per-channel shift ``s``
    common to all ranks), each backward one of ``2C`` values. In evaluation
    the running statistics are used and nothing is communicated.

    A drop-in replacement for :class:`torch.nn.SyncBatchNorm`: same
    constructor, parameters, buffers and ``state_dict`` keys, so checkpoints
    move both ways between it, ``torch.nn.SyncBatchNorm`` and
    ``torch.nn.BatchNorm1d/2d/3d``. Unlike it, it runs on CPU tensors and
    inside CPU :class:`~torch.nn.parallel.DistributedDataParallel` (it does not
    subclass ``torch.nn.SyncBatchNorm``, which DDP refuses on CPU).

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`.
        eps: added to the variance for numerical stability. Default: 1e-5
        momentum: factor of the running statistics update; ``None`` for a
            cumulative moving average. Default: 0.1
        affine: learnable :math:`\gamma` and :math:`\beta`. Default: ``True``
        track_running_stats: keep running mean and variance for evaluation;
            if ``False``, batch statistics are used in evaluation too (local
            to each rank, without communication). Default: ``True``
        process_group: what the statistics are summed over: ``None`` or
            ``"auto"`` (torch.distributed if initialized, through shared
            memory when all its ranks are on this host; else MPI
            ``COMM_WORLD`` when launched with more than one rank; else this
            process alone), ``"torch"``, ``"mpi"``, ``"local"``, ``"shm"``, a
            ``torch.distributed.ProcessGroup``, an mpi4py communicator, or a
            :class:`syncbn.comm.Communicator`. Default: ``None``
        device, dtype: of the parameters and buffers (CPU only).
        debug: before every forward, check with one small collective that all
            ranks agree on this layer (channels, input dtype, train/eval, call
            count, order of construction) and raise the same error on every
            rank if not; eval-mode calls join that check too, and in training
            a second check precedes the backward collective. Every rank must
            then build the same SyncBatchNorm layers in the same order. Default: the environment variable
            ``SYNCBN_DEBUG`` (``1`` turns it on).
        activation: ``None``, ``"relu"``, ``"relu6"``, ``"leaky_relu"`` or
            ``"silu"``: applied to the normalized output (after the residual,
            if one is passed to ``forward``), fused into the layer's passes.
            Default: ``None``
        negative_slope: of ``"leaky_relu"``. Default: 0.01

    ``forward(input, residual=None)``: ``residual``, a tensor of the input's
    shape and dtype, is added after the affine transform and before the
    activation, so ``SyncBatchNorm(C, activation="relu")(x, identity)`` is
    ``relu(bn(x) + identity)`` in one layer.

    Shape:
        - Input: :math:`(N, C, +)`, any rank >= 2; channels-last and
          channels-last-3d inputs are read in place, with no transposed copy.
        - Output: same shape, dtype and memory format as the input.

    Every rank must call every synchronized layer the same number of times,
    in the same order, in the same mode: a rank with no samples still calls
    it (with an empty batch) and joins the collectives.

    Examples::

        >>> # mpirun -n 4 python train.py   or   torchrun --nproc_per_node 4 train.py
        >>> bn = syncbn.SyncBatchNorm(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
        >>> model = syncbn.convert_sync_batchnorm(torchvision_model)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: CommSpec = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        debug: bool | None = None,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)
        self.process_group = process_group
        self._comm: Communicator | None = None
        # Common shift of the statistics sums (see function.py); starts at
        # zero on every rank, then follows the global mean. Derived state: a
        # float64 CPU tensor kept out of the parameters and buffers (so out of
        # state_dict, dtype conversions and DDP's broadcasts), which the
        # compiled path carries as a graph input that its operator updates.
        self._shift_tensor = torch.zeros(num_features, dtype=torch.float64)
        self._shift = self._shift_tensor.numpy()  # the eager path's view (the same memory)
        # names this layer's communicator in the compiled path's operators (_ops.py)
        self._op_key = _ops.register(self)
        # the kernels' views of the parameters and buffers, kept between calls
        self._arrays = LayerArrays()
        if debug is None:
            debug = switched_on("SYNCBN_DEBUG")
        self.debug = debug
        # numbered whether or not debug mode is on: it can be turned on later
        self._check = LayerCheck(process_group)

    @property
    def communicator(self) -> Communicator:
        """The communicator this layer sums over, resolved on first use."""
        if self._comm is None:
            self._comm = get_communicator(self.process_group)
        return self._comm

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "process_group":
            # a new group invalidates the resolved communicator
            self.__dict__["_comm"] = None
        elif name == "activation":
            check_activation(value, 0.0)
        elif name == "negative_slope":
            check_activation(None, value)
        super().__setattr__(name, value)

    def __getstate__(self) -> dict[str, Any]:
        # the resolved communicator holds live handles (copy.deepcopy, pickle)
        # torch leaves Module.__getstate__ unannotated
        state: dict[str, Any] = super().__getstate__()  # type: ignore[no-untyped-call]
        state["_comm"] = None
        state["_arrays"] = None  # views of this process's memory
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch leaves Module.__setstate__ unannotated
        super().__setstate__(state)  # type: ignore[no-untyped-call]
        # pickled by an earlier version: no activation, a NumPy shift
        self.__dict__.setdefault("activation", None)
        self.__dict__.setdefault("negative_slope", 0.01)
        if "_shift_tensor" not in self.__dict__:
            self._shift_tensor = torch.from_numpy(self._shift)
        # a copy's view must be of its own tensor (copied apart, they share no memory)
        self._shift = self._shift_tensor.numpy()
        self._op_key = _ops.register(self)  # a copy is a new layer: its own key
        self._arrays = LayerArrays()

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"SyncBatchNorm: expected an input of at least 2 dimensions (N, C, ...) "
                f"(got {input.dim()}D input of shape {list(input.shape)})"
            )

    def _check_input(self, input: torch.Tensor) -> None:
        # The rule for every error path: raise before any collective is
        # entered, or after one on every rank alike. These depend on local
        # input, so they come before the first allreduce; a rank that alone
        # gets a bad input then leaves the others waiting in it unless debug
        # mode (which compares the ranks first) or the launcher ends the job.
        # (each torch attribute costs on the per-call path: each is read once)
        shape = input.shape
        if len(shape) < 2:
            self._check_input_dim(input)
        if shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm: expected input with {self.num_features} channels "
                f"(num_features) in dimension 1 (got {shape[1]}, input shape "
                f"{list(shape)})"
            )
        if not input.dtype.is_floating_point:
            raise TypeError(
                "SyncBatchNorm: expected a floating-point input (float32, float64, "
                f"float16 or bfloat16) (got {input.dtype})"
            )
        if not input.is_cpu:
            raise ValueError(
                f"SyncBatchNorm: expected a CPU tensor (got device {input.device}); "
                "for GPUs use torch.nn.SyncBatchNorm"
            )

    def _member(self, table: dict[str, Any], name: str) -> Any:
        """``getattr(self, name)`` for a parameter or buffer, straight from its
        table when it is there (Module.__getattr__ costs on the forward path);
        through getattr when something (a parametrization, weight norm) has
        taken it out."""
        found = table.get(name, _ABSENT)
        return getattr(self, name) if found is _ABSENT else found

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        checked = self._check.enter(self, input) if self.debug else None
        self._check_input(input)
        if residual is not None:
            check_residual("SyncBatchNorm", input, residual)
        # The decisions of torch.nn.modules.batchnorm._BatchNorm.forward.
        params, buffers = self._parameters, self._buffers
        weight, bias = self._member(params, "weight"), self._member(params, "bias")
        running_mean = self._member(buffers, "running_mean")
        running_var = self._member(buffers, "running_var")
        bn_training = self.training or (running_mean is None and running_var is None)
        if not bn_training:
            fused = residual is not None or self.activation is not None
            if fused and not torch.compiler.is_compiling() and not needs_grad(input, weight, bias, residual):
                activation = KERNEL_ACTIVATIONS[self.activation]
                return normalize_with_running_stats(
                    input,
                    running_mean,
                    running_var,
                    weight,
                    bias,
                    self.eps,
                    residual,
                    activation,
                    self.negative_slope,
                )
            out = F.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, self.eps)
            return self._activate(out, residual)
        if torch.compiler.is_compiling() and not self.debug:
            # (the compiler fuses the add and the activation itself)
            return self._activate(self._traced_forward(input, weight, bias), residual)
        activation = KERNEL_ACTIVATIONS[self.activation]
        if not self.training:
            # Batch statistics in eval (track_running_stats=False) stay local,
            # like torch.nn.SyncBatchNorm's; a scratch shift keeps the shared
            # one identical across ranks.
            local = LayerArgs(
                None,
                None,
                None,
                self._shift.copy(),
                self.eps,
                self.momentum,
                _LOCAL,
                activation,
                self.negative_slope,
            )
            return sync_batch_norm(input, weight, bias, local, residual)
        tracking = self.track_running_stats
        comm = checked if checked is not None else self.communicator
        args = LayerArgs(
            running_mean if tracking else None,
            running_var if tracking else None,
            self._member(buffers, "num_batches_tracked") if tracking else None,
            self._shift,
            self.eps,
            self.momentum,
            comm,
            activation,
            self.negative_slope,
            self._arrays,
        )
        return sync_batch_norm(input, weight, bias, args, residual)

    def _activate(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """``activation(out + residual)`` with torch's functions."""
        if residual is not None:
            out = out + residual
        return apply_activation(out, self.activation, self.negative_slope)

    def _traced_forward(
        self, input: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """The forward's batch-statistics branch as torch.compile traces it:
        the same steps, as the operators of _ops.py (debug mode stays eager:
        its check is not traceable)."""
        shift = self._shift_tensor
        if not self.training:
            return _ops.sync_batch_norm(
                input, weight, bias, shift.clone(), None, None, None, self.eps, self.momentum, _ops.LOCAL
            )
        buffers = self._buffers
        tracking = self.track_running_stats
        return _ops.sync_batch_norm(
            input,
            weight,
            bias,
            shift,
            self._member(buffers, "running_mean") if tracking else None,
            self._member(buffers, "running_var") if tracking else None,
            self._member(buffers, "num_batches_tracked") if tracking else None,
            self.eps,
            self.momentum,
            self._op_key,
        )

    def extra_repr(self) -> str:
        # torch leaves extra_repr unannotated
        base: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return (
            base
            + _activation_repr(self)
            + (f", process_group={self.process_group!r}" if self.process_group is not None else "")
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: CommSpec = None, **kwargs: Any
    ) -> torch.nn.Module:
        """See :func:`syncbn.convert_sync_batchnorm` (``fuse=`` and ``subclasses=`` included)."""
        from .convert import convert_sync_batchnorm

        return convert_sync_batchnorm(module, process_group, **kwargs)


_LOCAL = LocalCommunicator()
_ABSENT = object()  # (not in a module's table)


def _activation_repr(layer: SyncBatchNorm | BatchNorm) -> str:
    if layer.activation is None:
        return ""
    slope = f", negative_slope={layer.negative_slope}" if layer.activation == "leaky_relu" else ""
    return f", activation={layer.activation!r}{slope}"


class BatchNorm(_BatchNorm):
    r"""Plain, unsynchronized batch normalization over an input of any rank >= 2,
    optionally followed by a residual add and an activation.

    What :func:`revert_sync_batchnorm` turns a synchronized layer into: the
    same computation as ``torch.nn.BatchNorm1d/2d/3d`` (it is torch's own
    implementation), then ``+ residual`` and the activation with torch's
    functions; the same constructor, parameters, buffers and ``state_dict``
    keys as :class:`SyncBatchNorm`. Like it, it accepts every input shape
    ``(N, C, *)``, so a reverted model runs on whatever the synchronized one did.

    Args:
        activation, negative_slope: as in :class:`SyncBatchNorm`.

    Examples::

        >>> bn = syncbn.BatchNorm(64)
        >>> y = bn(torch.randn(8, 64, 32, 32))
        >>> block_out = syncbn.BatchNorm(64, activation="relu")(x, identity)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        activation: str | None = None,
        negative_slope: float = 0.01,
    ) -> None:
        check_activation(activation, negative_slope)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"BatchNorm: expected an input of at least 2 dimensions (N, C, ...) "
                f"(got {input.dim()}D input of shape {list(input.shape)})"
            )

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = super().forward(input)
        if residual is not None:
            check_residual("BatchNorm", input, residual)
            out = out + residual
        return apply_activation(out, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        # torch leaves extra_repr unannotated
        base: str = super().extra_repr()  # type: ignore[no-untyped-call]
        return base + _activation_repr(self)
