r"""Structure probes: the paper's per-layer measurements of one update, as a ``transformers.TrainerCallback``.

Every ``probe_interval`` optimizer steps the callback measures one update :math:`w \to w + \Delta w`,
with :math:`\Delta w = w_{\text{after}} - w_{\text{before}}`, per layer (one parameter tensor, named as in
``model.named_parameters()``) and in total (the Euclidean norm over all trainable parameters):

- ``grad_norm`` :math:`\|g\|`: the training gradient in ``.grad`` when the optimizer is called,
  i.e. *after* the Trainer's gradient clipping (``max_grad_norm``), unscaling (fp16) and the
  all-reduce across ranks: the gradient the optimizer consumes. (The Trainer's own ``grad_norm`` log
  is the norm *before* clipping.)
- ``update_norm`` :math:`\|\Delta w\|`: the parameter-update step length.
- on a fixed probe batch :math:`B`, in eval mode (no dropout) and without autocast, the probe loss
  :math:`L = L_B` just before and just after the update: ``loss_before``, ``loss_after``, the
  loss-update step ``loss_change`` :math:`\Delta L = L(w_{\text{after}}) - L(w_{\text{before}})`
  and its length ``abs_loss_change`` :math:`|\Delta L|`;
- ``probe_grad_norm`` :math:`\|g_B\|` with :math:`g_B = \nabla L_B(w_{\text{before}})`, the
  first-order prediction ``grad_dot_update`` :math:`\langle g_B, \Delta w\rangle`, and the secant
  curvature of the probe loss along the update

  .. math::

      \kappa = \frac{2\,\big(\Delta L - \langle g_B, \Delta w\rangle\big)}{\|\Delta w\|^2}
             = \frac{2\,\big(L_{\text{after}} - L_{\text{before}} + \langle g_B, s\rangle\big)}{\|s\|^2},
      \qquad s = w_{\text{before}} - w_{\text{after}},

  the exact :math:`\Delta w^\top H \Delta w / \|\Delta w\|^2` when :math:`L_B` is quadratic (Taylor:
  :math:`\Delta L = \langle g_B, \Delta w\rangle + \tfrac12 \Delta w^\top H \Delta w + O(\|\Delta w\|^3)`).
  The gradient is the probe batch's own, taken from the same eval-mode forward pass as
  ``loss_before`` (one extra backward on probe steps, with ``torch.autograd.grad``: ``.grad`` is not
  touched), so that loss change and gradient belong to the same function;
- when the optimizer is one of this package's (it has ``layer_stats()``), per layer the optimizer's
  own smoothed ``curvature`` :math:`c_l`, its ``rate`` :math:`r_l` and the layer learning rate
  ``lr`` :math:`= \eta\, r_l` (the group's learning rate of that step times the rate).

The probes do not change training: the probe passes run under eval mode with the model's mode
restored afterwards, draw no random numbers and leave ``.grad`` alone.

Timing in the Trainer: the "before" measurements run in ``on_pre_optimizer_step`` (gradients accumulated,
all-reduced and clipped; activations freed), the "after" ones in ``on_optimizer_step`` (before the
learning-rate scheduler steps and the gradients are zeroed). Memory: on probe steps only, one copy of
the trainable weights (the snapshot) and one of the probe gradient live across the optimizer step.

Distributed: under DDP every rank measures the full (replicated) parameters and the all-reduced
gradients, so every rank computes the same numbers; only the world process zero writes the file.
Under DeepSpeed the optimizer step runs inside the backward of the last micro-batch (Accelerate's
``DeepSpeedEngineWrapper``), so the "before" measurements are taken at ``on_step_begin`` instead (the
snapshot then also lives through the step's forward and backward passes) and
the training gradient is not available (ZeRO keeps it in its own partitioned buffers): ``grad_norm``
is ``None``. Under ZeRO-3 the parameters are partitioned: the weight-based measurements (update,
gradient norms, curvature) are skipped, with a one-time warning, and only the probe-loss change is
recorded. FSDP shards parameters too and is not supported (norms would be those of the local shards).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_deepspeed_available
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from hf_cblr.diagnostics.layer_stats import optimizer_layer_stats

logger = logging.getLogger(__name__)

#: The file, in ``args.output_dir``, that receives one JSON record per probe step.
PROBES_FILE = "structure_probes.jsonl"
#: The prefix of the scalars the callback adds to the Trainer's logs.
LOG_PREFIX = "probe/"

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The default probe loss: ``model(**batch)``'s ``loss`` (the batch must hold the labels)."""
    outputs = model(**batch)
    if isinstance(outputs, Mapping):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)):
        loss = outputs[0]
    else:
        loss = outputs
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            "the probe batch must make model(**batch) return a scalar loss (include the labels), "
            "or pass loss_fn=... to StructureProbeCallback"
        )
    return loss


@dataclass
class _Before:
    """What is measured before the update of a probe step."""

    step: int
    names: list[str]
    params: list[Tensor]
    loss: float
    weights: list[Tensor] | None  # None under ZeRO-3
    probe_grads: list[Tensor | None] | None
    grad_norms: list[float | None] | None  # None where the training gradient is not in .grad


class StructureProbeCallback(TrainerCallback):
    r"""Measure gradient norm, update length, probe-loss change and curvature every ``probe_interval`` steps.

    Works with any ``transformers.Trainer`` and any optimizer; see the module docstring for the
    definitions. Probe steps are the optimizer steps ``k * probe_interval`` (``k = 1, 2, ...``).

    Args:
        probe_batch: the fixed probe batch, a mapping of model inputs (with labels) as a collator
            returns it; tensors are moved to the model's device. ``None`` (default): the first
            ``probe_batch_size`` examples of the training dataset, in dataset order (not shuffled,
            so identical on every rank and across resumes), collated by the training dataloader's
            collator when training begins.
        probe_interval: probe every this many optimizer steps.
        probe_batch_size: examples in the default probe batch (``None``: ``per_device_train_batch_size``).
        loss_fn: ``loss_fn(model, batch) -> scalar loss`` for the probe (default :func:`model_loss`,
            the model's own ``loss`` output); give it when the Trainer computes its loss differently.
        log_per_layer: also add per-layer scalars ``probe/<layer>/<metric>`` to the Trainer's logs
            (the JSON lines file always has them).
        global_batch_size: ``global_batch_size(state) -> int``, the global batch of the current step,
            for trainers that change it; default ``per_device_train_batch_size * gradient_accumulation_steps
            * world_size``.

    Output: per probe step a record, appended to :attr:`records` and (world process zero only) to
    ``<output_dir>/structure_probes.jsonl``::

        {"step": int, "global_batch_size": int,
         "total": {"loss_before", "loss_after", "loss_change", "abs_loss_change", "grad_norm",
                   "update_norm", "probe_grad_norm", "grad_dot_update", "curvature"},
         "layers": {name: {"grad_norm", "update_norm", "probe_grad_norm"[, "curvature", "rate", "lr"]}}}

    with ``null`` for what is not available (``curvature`` when the update is zero, e.g. a step
    skipped on fp16 overflow). A fresh run truncates the file; a resumed run keeps the records up
    to the resumed step. The same numbers go to the Trainer's loggers as ``probe/<total key>``
    (e.g. ``probe/grad_norm``, ``probe/update_norm``, ``probe/loss_change``, ``probe/curvature``):
    the callback makes every probe step a logging step and adds its scalars to that step's logs in
    ``on_log``. The reporting integrations (``report_to``) are callbacks that the Trainer places
    *before* the ones given to it, so use :meth:`attach` (``StructureProbeCallback(...).attach(trainer)``)
    for TensorBoard & co. to see the probes; ``trainer.state.log_history`` gets them either way.
    """

    def __init__(
        self,
        probe_batch: Mapping[str, Any] | None = None,
        probe_interval: int = 50,
        *,
        probe_batch_size: int | None = None,
        loss_fn: LossFn = model_loss,
        log_per_layer: bool = False,
        global_batch_size: Callable[[TrainerState], int] | None = None,
    ) -> None:
        if isinstance(probe_interval, bool) or not isinstance(probe_interval, int) or probe_interval < 1:
            raise ValueError(f"probe_interval must be an integer >= 1, got {probe_interval!r}")
        if probe_batch_size is not None and (isinstance(probe_batch_size, bool) or not isinstance(probe_batch_size, int)
                                             or probe_batch_size < 1):
            raise ValueError(f"probe_batch_size must be None or an integer >= 1, got {probe_batch_size!r}")
        if probe_batch is not None and probe_batch_size is not None:
            raise ValueError("give either probe_batch or probe_batch_size (the size of the default probe batch), not both")
        self.probe_batch = probe_batch
        self.probe_interval = probe_interval
        self.probe_batch_size = probe_batch_size
        self.loss_fn = loss_fn
        self.log_per_layer = log_per_layer
        self.global_batch_size = global_batch_size
        #: The records of this run's probe steps, on every rank.
        self.records: list[dict[str, Any]] = []
        self._batch: Mapping[str, Any] | None = probe_batch
        self._update_in_backward = False
        self._before: _Before | None = None
        self._pending_logs: dict[str, float] = {}
        self._pending_step = 0
        self._warned_zero3 = False

    def attach(self, trainer: Trainer) -> StructureProbeCallback:
        """Make this the trainer's first callback, so every reporting integration logs the probe scalars."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    # -- Trainer events ------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._update_in_backward = _steps_inside_backward(kwargs.get("optimizer"))
        self._before = None
        self._pending_logs = {}
        self.records = []
        if self.probe_batch is None:
            self._batch = _dataset_head(kwargs.get("train_dataloader"),
                                        self.probe_batch_size or args.per_device_train_batch_size)
        if state.is_world_process_zero:
            _prepare_file(Path(args.output_dir) / PROBES_FILE, keep_until_step=state.global_step)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._update_in_backward and self._is_probe_step(state):
            self._before = self._measure_before(kwargs["model"], state, with_training_grads=False)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        if not self._update_in_backward and self._is_probe_step(state):
            self._before = self._measure_before(kwargs["model"], state, with_training_grads=True)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> TrainerControl | None:
        before, self._before = self._before, None
        if before is None or before.step != state.global_step + 1:
            return None
        record = self._measure_after(before, kwargs["model"], kwargs.get("optimizer"), args, state)
        self.records.append(record)
        if state.is_world_process_zero:
            with open(Path(args.output_dir) / PROBES_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(record, allow_nan=False) + "\n")
        self._pending_logs, self._pending_step = _scalars(record, self.log_per_layer), record["step"]
        control.should_log = True
        return control

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not self._pending_logs or logs is None or self._pending_step != state.global_step:
            return
        scalars, self._pending_logs = self._pending_logs, {}
        logs.update(scalars)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(scalars)

    # -- measurements --------------------------------------------------------------------------------
    def _is_probe_step(self, state: TrainerState) -> bool:
        return (state.global_step + 1) % self.probe_interval == 0

    def _measure_before(self, model: nn.Module, state: TrainerState, *, with_training_grads: bool) -> _Before:
        named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        names, params = [name for name, _ in named], [param for _, param in named]
        batch = self._device_batch(params)
        step = state.global_step + 1
        if any(hasattr(param, "ds_id") for param in params):  # DeepSpeed ZeRO-3: partitioned parameters
            if not self._warned_zero3:
                logger.warning("StructureProbeCallback: DeepSpeed ZeRO-3 partitions the parameters; only the probe-loss "
                               "change is recorded (no gradient norms, update norms or curvature)")
                self._warned_zero3 = True
            with _eval_mode(model), torch.no_grad():
                loss = self.loss_fn(model, batch)
            return _Before(step, names, params, float(loss), None, None, None)
        grad_norms = None
        if with_training_grads:
            grad_norms = _norms([param.grad for param in params])
        with _eval_mode(model), torch.enable_grad():
            loss = self.loss_fn(model, batch)
            probe_grads = list(torch.autograd.grad(loss, params, allow_unused=True))
        weights = [param.detach().clone() for param in params]
        return _Before(step, names, params, float(loss.detach()), weights, probe_grads, grad_norms)

    def _measure_after(self, before: _Before, model: nn.Module, optimizer: Optimizer | None,
                       args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        with _eval_mode(model), torch.no_grad():
            loss_after = float(self.loss_fn(model, self._device_batch(before.params)))
        loss_change = loss_after - before.loss
        total: dict[str, float | None] = {
            "loss_before": before.loss, "loss_after": loss_after, "loss_change": loss_change,
            "abs_loss_change": abs(loss_change), "grad_norm": None, "update_norm": None, "probe_grad_norm": None,
            "grad_dot_update": None, "curvature": None,
        }
        layers: dict[str, dict[str, float | None]] = {}
        if before.weights is not None and before.probe_grads is not None:
            update_norms, dots = _update_norms_and_dots(before.params, before.weights, before.probe_grads)
            probe_norms = _norms(before.probe_grads)
            grad_norms = before.grad_norms or [None] * len(before.names)
            for i, name in enumerate(before.names):
                layers[name] = {"grad_norm": grad_norms[i], "update_norm": update_norms[i], "probe_grad_norm": probe_norms[i]}
            update_norm, grad_dot_update = _total(update_norms), math.fsum(dots)
            total.update(grad_norm=_total(grad_norms), update_norm=update_norm, probe_grad_norm=_total(probe_norms),
                         grad_dot_update=grad_dot_update)
            if update_norm:  # None or 0 when the step was skipped
                total["curvature"] = 2.0 * (loss_change - grad_dot_update) / update_norm**2
        for name, stats in optimizer_layer_stats(optimizer, model).items():
            layers.setdefault(name, {}).update(stats)
        batch_size = (self.global_batch_size(state) if self.global_batch_size is not None
                      else args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size)
        return {"step": before.step, "global_batch_size": batch_size, "total": _finite(total),
                "layers": {name: _finite(values) for name, values in layers.items()}}

    def _device_batch(self, params: list[Tensor]) -> Mapping[str, Any]:
        if self._batch is None:
            raise RuntimeError("StructureProbeCallback has no probe batch: pass probe_batch=... or train with a Trainer")
        device = params[0].device
        if any(isinstance(value, Tensor) and value.device != device for value in self._batch.values()):
            self._batch = {key: value.to(device) if isinstance(value, Tensor) else value for key, value in self._batch.items()}
        return self._batch


# -- helpers -------------------------------------------------------------------------------------------
@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; the previous mode of every submodule afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _floats(scalars: list[Tensor]) -> list[float]:
    """0-d tensors (possibly on several devices) as floats, with one device sync."""
    if not scalars:
        return []
    return torch.stack([scalar.to(scalars[0].device) for scalar in scalars]).tolist()


def _norms(tensors: Iterable[Tensor | None]) -> list[float | None]:
    """The fp32 Euclidean norm of each tensor (``None`` for ``None``)."""
    tensors = list(tensors)
    values = iter(_floats([torch.linalg.vector_norm(t.detach(), dtype=torch.float32) for t in tensors if t is not None]))
    return [None if t is None else next(values) for t in tensors]


@torch.no_grad()
def _update_norms_and_dots(params: list[Tensor], weights: list[Tensor],
                           probe_grads: list[Tensor | None]) -> tuple[list[float], list[float]]:
    """Per layer ``|dw_l|`` and ``<g_l, dw_l>`` (0 where the probe loss does not depend on the layer), in fp32,
    with ``dw_l = param - weight`` formed one layer at a time."""
    norms, dots = [], []
    for param, weight, grad in zip(params, weights, probe_grads, strict=True):
        update = param.float() - weight.float()
        norms.append(torch.linalg.vector_norm(update))
        dots.append(update.new_zeros(()) if grad is None else torch.dot(grad.float().flatten(), update.flatten()))
    values = _floats(norms + dots)
    return values[: len(params)], values[len(params):]


def _total(norms: list[float | None]) -> float | None:
    """The norm over all layers from the layer norms (missing layers count as 0); ``None`` if all are missing."""
    present = [norm for norm in norms if norm is not None]
    if not present:
        return None
    return math.sqrt(math.fsum(norm * norm for norm in present))


def _finite(values: Mapping[str, float | None]) -> dict[str, float | None]:
    """``None`` for non-finite numbers (JSON has no NaN or infinity)."""
    return {key: value if value is None or math.isfinite(value) else None for key, value in values.items()}


def _steps_inside_backward(optimizer: Any) -> bool:
    """Accelerate's DeepSpeed wrapper: the DeepSpeed engine updates the weights inside ``accelerator.backward``."""
    if not is_deepspeed_available():  # accelerate defines the wrapper only where DeepSpeed is installed
        return False
    from accelerate.utils import DeepSpeedOptimizerWrapper

    return isinstance(optimizer, DeepSpeedOptimizerWrapper)


def _scalars(record: Mapping[str, Any], per_layer: bool) -> dict[str, float]:
    """The record's numbers as ``probe/<total key>`` (and ``probe/<layer>/<key>``) logging scalars."""
    scalars = {f"{LOG_PREFIX}{key}": value for key, value in record["total"].items() if value is not None}
    if per_layer:
        for name, values in record["layers"].items():
            scalars.update({f"{LOG_PREFIX}{name}/{key}": value for key, value in values.items() if value is not None})
    return scalars


def _dataset_head(dataloader: Any, size: int) -> Mapping[str, Any]:
    """The first ``size`` examples of the dataloader's dataset, collated by its ``collate_fn``."""
    if dataloader is None or getattr(dataloader, "dataset", None) is None:
        raise ValueError("StructureProbeCallback needs probe_batch=... when there is no training dataloader")
    dataset = dataloader.dataset
    if isinstance(dataset, torch.utils.data.IterableDataset):
        examples = list(islice(iter(dataset), size))
    else:
        examples = [dataset[i] for i in range(min(size, len(dataset)))]
    if not examples:
        raise ValueError("StructureProbeCallback: the training dataset is empty; pass probe_batch=...")
    batch = dataloader.collate_fn(examples)
    if not isinstance(batch, Mapping):
        raise TypeError(f"StructureProbeCallback: the collator returned {type(batch).__name__}, not a mapping of "
                        "model inputs; pass probe_batch=... and loss_fn=...")
    return batch


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON lines file; a line that is not JSON is a ``ValueError`` naming the file and line."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON record ({error.msg}); the file was cut short or "
                                 "edited: delete it, or the line, to start the probes afresh") from None
    return records


def _prepare_file(path: Path, keep_until_step: int) -> None:
    """Start the JSON lines file: empty for a fresh run, the records up to the resumed step otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if keep_until_step > 0 and path.exists():
        kept = [json.dumps(record, allow_nan=False) for record in read_json_lines(path) if record["step"] <= keep_until_step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
