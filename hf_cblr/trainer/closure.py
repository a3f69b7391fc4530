"""The curvature closure of ``CBLRTrainer``: what the ``hvp``/``fd``/``hutchinson`` estimators re-evaluate.

``transformers.Trainer`` calls ``optimizer.step()`` without a closure. When the optimizer's estimator needs one, a step
pre-hook (``Optimizer.register_step_pre_hook``, which may rewrite the step's arguments) passes ``closure=`` to every
step whatever wraps the optimizer (Accelerate, a gradient scaler); the optimizer calls it every ``update_interval``
steps. The closure re-evaluates the loss of the step's micro-batches on this rank, each with the normalization of its
backward and with the RNG state of its training forward restored (same dropout masks, so ``fd`` differences the same
function), through the unwrapped model; it never calls backward. With several ranks, tensor hooks average across ranks
every gradient the estimator takes through it (a differentiable all-reduce, so Hessian-vector products too): the
estimate is the global batch's, the same on every rank. The closure holds the graph of the step's local micro-batches
at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from hf_cblr._distributed import world_size
from hf_cblr.integrations.transformers import find_optimizer

RNGState = tuple[Tensor, tuple[int, Tensor] | None]


class ClosureTrainer(Protocol):
    """What the closure uses of its trainer (``CBLRTrainer``): the Trainer's attributes and the two losses."""

    accelerator: Any
    model_wrapped: Any
    args: Any
    is_deepspeed_enabled: bool
    is_fsdp_enabled: bool

    def trainer_loss(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor: ...

    def per_sample_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor: ...


@dataclass
class Replay:
    """What the closure needs to re-evaluate one micro-batch's loss."""

    inputs: dict[str, Any]
    rng_state: RNGState
    scale: float
    #: ``None``: the Trainer's own loss (``compute_loss``); else the per-sample losses at these rows are summed.
    rows: Tensor | None = None
    num_items_in_batch: Any = None


class CurvatureClosure:
    """Records the step's training forwards and replays them as the optimizer's closure."""

    def __init__(self, trainer: ClosureTrainer) -> None:
        self.trainer = trainer
        self.replays: list[Replay] = []
        self._optimizers: set[int] = set()
        self._grad_hooks: list[Any] = []

    @property
    def active(self) -> bool:
        """An optimizer that needs the closure is installed: the forwards must be recorded."""
        return bool(self._optimizers)

    def install(self, optimizer: Optimizer) -> None:
        """Register the step hooks that hand the closure to our optimizer when its estimator needs one."""
        trainer = self.trainer
        ours = find_optimizer(optimizer)
        if ours is None or not ours.estimator.needs_closure or id(ours) in self._optimizers:
            return
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(f"curvature={ours.curvature!r} needs optimizer.step(closure), which "
                             f"{'DeepSpeed' if trainer.is_deepspeed_enabled else 'FSDP'} never passes to the optimizer; "
                             "use curvature 'secant', 'secant_elementwise' or 'weight_norm', or train without it")
        if trainer.args.n_gpu > 1:
            raise ValueError(f"curvature={ours.curvature!r} does not support torch.nn.DataParallel (n_gpu > 1): launch "
                             "one process per device with torchrun or accelerate launch")
        ours.register_step_pre_hook(self._supply)
        ours.register_step_post_hook(self._remove_grad_hooks)
        self._optimizers.add(id(ours))

    def new_step(self) -> None:
        self.replays = []

    def begin(self, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Callable[..., None] | None:
        """Before a training forward of ``inputs``: its RNG state; call what this returns with the loss's scale (and
        the summed rows of the per-sample losses, or None for the Trainer's loss) to record it. None when inactive."""
        if not self.active:
            return None
        rng_state = self._rng_state()

        def finish(scale: float, rows: Tensor | None = None) -> None:
            self.replays.append(Replay(inputs, rng_state, scale, rows=rows, num_items_in_batch=num_items_in_batch))

        return finish

    def __call__(self) -> Tensor:
        """The current step's loss on this rank, re-evaluated without backward."""
        if not self.replays:
            raise RuntimeError("the curvature closure was called outside a training step of CBLRTrainer")
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        total: Tensor | None = None
        for replay in self.replays:
            devices = [replay.rng_state[1][0]] if replay.rng_state[1] is not None else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(replay.rng_state[0])
                if replay.rng_state[1] is not None:
                    torch.cuda.set_rng_state(replay.rng_state[1][1], replay.rng_state[1][0])
                if replay.rows is None:
                    loss = trainer.trainer_loss(model, replay.inputs, num_items_in_batch=replay.num_items_in_batch)
                else:
                    loss = trainer.per_sample_loss(model, replay.inputs)[replay.rows].sum()
            loss = loss * replay.scale
            total = loss if total is None else total + loss
        return total

    def _supply(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (args[1] if len(args) > 1 else kwargs.get("closure")) is not None:
            return None
        if world_size() > 1:
            self._grad_hooks = [param.register_hook(_AllReduceMean.apply) for group in optimizer.param_groups
                                for param in group["params"] if param.requires_grad]
        return args[:1], {**kwargs, "closure": self}

    def _remove_grad_hooks(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []

    def _rng_state(self) -> RNGState:
        """The RNG state before a training forward, for its replay."""
        device = self.trainer.args.device
        cuda = None
        if torch.cuda.is_available() and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = (index, torch.cuda.get_rng_state(index))
        return torch.get_rng_state(), cuda


class _AllReduceMean(torch.autograd.Function):
    """The mean over ranks, differentiable (its backward is the mean over ranks of the incoming gradient)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total / dist.get_world_size()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _AllReduceMean.apply(grad)
