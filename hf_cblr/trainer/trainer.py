r"""``CBLRTrainer``: the ``transformers.Trainer`` with the hf_cblr optimizers, batch-size ramping, small-loss dropping
and the closure that the ``hvp``/``fd``/``hutchinson`` curvature estimators need.

**Optimizer.** With ``optim`` an hf_cblr name, :meth:`CBLRTrainer.create_optimizer` builds it from
``learning_rate``, the Adam arguments and ``optim_args``, on named param groups: the Trainer's
decay/no-decay split (:meth:`~transformers.Trainer.get_decay_parameter_names`, ``weight_decay`` on
the decayed group) crossed with hf_cblr's adaptation mask (:func:`hf_cblr.param_groups`: biases
and norm layers get no layer rate). What trains is checked to be ours when training starts
(:class:`~hf_cblr.integrations.OptimizerCheckCallback`). Under DeepSpeed, a config section
``"optimizer": {"type": "CBLR" | "MCLR" | "LARS", "params": {...}}`` is taken out of the config (DeepSpeed
cannot build it) and built the same way, its ``params`` over ``optim_args`` (``"auto"`` values and the
checks against the training arguments are transformers'); an optimizer instance passed as
``optimizers=`` is kept (transformers drops it, transformers#38753); the DeepSpeed config is made to
keep the client optimizer under ZeRO-Offload (:func:`~hf_cblr.integrations.prepare_deepspeed_config`);
and under ZeRO an estimator that cannot run on ZeRO partitions stops training at its start
(:func:`~hf_cblr.optim.partitioned.check_zero_support`). Every hf_cblr optimizer with an estimator that
needs no closure is layer-exact under ZeRO (``docs/zero.md``).

**Batch-size ramping** (``batch_size_schedule``, grammar in :mod:`hf_cblr.trainer.batch_schedule`).
The whole plan of global batch sizes is fixed when training starts (``max_steps`` steps, or enough
steps to consume ``num_train_epochs x len(train_dataset)`` samples) and a
:class:`~hf_cblr.trainer.batch_schedule.ScheduledBatchSampler` yields it: every step has
``gradient_accumulation_steps`` micro-batches per rank, of size ``B_k / (world_size x
gradient_accumulation_steps)``, so the stock loop, gradient accumulation, DDP and DeepSpeed run
unchanged. The Trainer's loop sees one long epoch; ``state.epoch`` is set to consumed samples /
dataset size, and ``"epoch"`` save/eval/logging strategies fire when a data epoch ends. A resumed
run skips the ``global_step x gradient_accumulation_steps`` micro-batches it has trained (the stock
resume) of the same deterministic stream, and the consumed samples saved in the checkpoint's
trainer state are checked against the plan. ``batch_size_lr_scaling`` multiplies the learning-rate
schedule (a ``LambdaLR``, as all of transformers' but ``reduce_lr_on_plateau``/``greedy``) by
``B_k / B_full`` or its square root. Logged: ``global_batch_size`` (of the last step) and
``consumed_samples``. With ``train_sampling_strategy="group_by_length"`` (and with no schedule too: the plan
is then the full batch at every step) each global batch is drawn at random as above and cut into
micro-batches of similar length, so dynamic padding pads little and the step's gradient is unchanged
(transformers' own ``LengthGroupedSampler`` would instead put samples of similar length in the same
global batch).

**Small-loss dropping** (``drop_fraction`` ...). Selection pool: the samples of one micro-step on
all ranks (with ``gradient_accumulation_steps = 1``, the global batch). The per-sample losses of the
pool are all-gathered, every rank selects the same kept set (top-k, or sampled by loss rank with a
generator seeded by ``(seed, step, micro-step)``), and each rank back-propagates

.. math::  L_r = \frac{W}{K} \sum_{i \in \text{kept on rank } r} \ell_i

with :math:`W` ranks and :math:`K` the samples kept over the whole step (all micro-steps, all
ranks; known before the first backward since the step's micro-batch sizes are). After DDP/DeepSpeed
average the gradients over ranks and accumulate them over micro-steps, the update's gradient is
exactly :math:`\nabla \frac1K \sum_{\text{kept}} \ell_i`: dropped samples count nowhere. Logged:
``drop_fraction``, ``kept_fraction`` (kept / seen since the last log) and ``drop_loss_threshold``
(the mean over pools of the smallest kept loss).

**Curvature closure.** ``transformers.Trainer`` calls ``optimizer.step()`` without a closure. When
the optimizer's estimator needs one, a step pre-hook (``Optimizer.register_step_pre_hook``, which may
rewrite the step's arguments) passes ``closure=`` to every step whatever wraps the optimizer
(Accelerate, a gradient scaler); the optimizer calls it every ``update_interval`` steps. The closure
re-evaluates the loss of the step's micro-batches on this rank, each with the normalization of its
backward and with the RNG state of its training forward restored (same dropout masks, so ``fd``
differences the same function), through the unwrapped model; it never calls backward. With several
ranks, tensor hooks average across ranks every gradient the estimator takes through it (a
differentiable all-reduce, so Hessian-vector products too): the estimate is the global batch's, the
same on every rank. The closure holds the graph of the step's local micro-batches at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, seed_worker
from transformers.utils import is_datasets_available

from hf_cblr.integrations.deepspeed import pop_optimizer_section
from hf_cblr.integrations.transformers import (
    OptimizerCheckCallback,
    check_optimizer_arguments,
    find_optimizer,
    parse_optim_args,
    prepare_deepspeed_config,
)
from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.param_groups import param_groups
from hf_cblr.optim.partitioned import check_zero_support
from hf_cblr.optim.registry import get_optimizer_info
from hf_cblr.trainer.arguments import CBLRTrainingArguments
from hf_cblr.trainer.batch_schedule import (
    FullBatch,
    ScheduledBatchSampler,
    batch_size_plan,
    consumed_samples,
    lr_scale,
    validate_batch_size_schedule,
)
from hf_cblr.trainer.sample_selection import drop_fraction_at, num_kept, per_sample_loss, select_kept

if is_datasets_available():
    import datasets

RNGState = tuple[Tensor, Tensor | None]
GROUP_BY_LENGTH = "group_by_length"
#: The ``train_sampling_strategy`` values that the batch-size plan's sampler follows.
SAMPLING_STRATEGIES = ("random", "sequential", GROUP_BY_LENGTH)


@dataclass
class _Replay:
    """What the curvature closure needs to re-evaluate one micro-batch's loss."""

    inputs: dict[str, Any]
    rng_state: RNGState
    scale: float
    #: ``None``: the Trainer's own loss (``compute_loss``); else the per-sample losses at these rows are summed.
    rows: Tensor | None = None
    num_items_in_batch: Any = None


@dataclass
class _StepState:
    """The current optimizer step: the sample counts of its selection pools, its loss scale, replays."""

    pool_sizes: list[list[int]] = field(default_factory=list)  # [micro-step][rank]
    loss_scale: float = 1.0  # W / K
    drop_fraction: float = 0.0
    micro_step: int = 0
    replays: list[_Replay] = field(default_factory=list)


class BatchScheduleCallback(TrainerCallback, ExportableState):
    """Keeps ``state.epoch`` in data epochs under a batch-size schedule, fires ``"epoch"`` strategies, and
    saves the consumed samples in the checkpoint's trainer state (checked against the plan on resume)."""

    def __init__(self) -> None:
        self.consumed: list[int] = [0]
        self.num_samples = 1
        self.consumed_samples = 0

    def configure(self, plan: list[int], num_samples: int) -> None:
        self.consumed = consumed_samples(plan)
        self.num_samples = num_samples

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"consumed_samples": self.consumed_samples}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.consumed_samples = self.consumed[min(state.global_step, len(self.consumed) - 1)]
        saved = (state.stateful_callbacks or {}).get(type(self).__name__, {})
        saved = saved.get("attributes", {}).get("consumed_samples") if isinstance(saved, dict) else None
        if state.global_step and saved is not None and saved != self.consumed_samples:
            raise ValueError(
                f"the checkpoint consumed {saved} samples in {state.global_step} steps, but batch_size_schedule gives "
                f"{self.consumed_samples}: resume with the batch_size_schedule, per_device_train_batch_size, world size "
                "and gradient_accumulation_steps of the checkpoint's run"
            )
        state.num_train_epochs = math.ceil(self.consumed[-1] / self.num_samples)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        before = self.consumed_samples // self.num_samples
        self.consumed_samples = self.consumed[state.global_step]
        state.epoch = self.consumed_samples / self.num_samples
        if self.consumed_samples // self.num_samples > before and state.global_step < state.max_steps:
            # A data epoch ended; the loop's own (single) epoch end covers the last step.
            control.should_log |= args.logging_strategy == IntervalStrategy.EPOCH
            control.should_evaluate |= args.eval_strategy == IntervalStrategy.EPOCH
            control.should_save |= args.save_strategy == SaveStrategy.EPOCH


#: Attribute of the training arguments that keeps the DeepSpeed config's hf_cblr "optimizer" section once popped.
_POPPED_SECTION = "_hf_cblr_deepspeed_optimizer_section"


class CBLRTrainer(Trainer):
    """``transformers.Trainer`` for :class:`CBLRTrainingArguments` (see the module docstring).

    Overridden hooks: ``create_optimizer``, ``create_scheduler`` (client optimizer/scheduler kept under
    DeepSpeed; batch-size LR scaling), ``get_train_dataloader`` and ``set_initial_training_values``
    (the batch-size plan), ``get_batch_samples`` (per-step drop bookkeeping), ``compute_loss``
    (dropping; recording for the closure) and ``log``. Override :meth:`per_sample_loss` for losses
    other than those of :func:`~hf_cblr.trainer.sample_selection.per_sample_loss`.
    """

    args: CBLRTrainingArguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CBLRTrainingArguments):
            raise TypeError(f"CBLRTrainer needs CBLRTrainingArguments, got {type(self.args).__name__}")
        self._client_optimizer, self._client_lr_scheduler = self.optimizer, self.lr_scheduler
        #: (registry name, kwargs) of the DeepSpeed config's hf_cblr "optimizer" section, taken out of the config
        self._config_optimizer = self._pop_deepspeed_optimizer_section() if self.is_deepspeed_enabled else None
        self._schedule = self.args.parsed_batch_size_schedule()
        if self._schedule is None and self.args.train_sampling_strategy == GROUP_BY_LENGTH:
            self._schedule = FullBatch()  # our sampler: random global batches cut into length-sorted micro-batches
        self._plan: list[int] | None = None
        self._consumed: list[int] = [0]
        self._step_state: _StepState | None = None
        self._closure_optimizers: set[int] = set()
        self._closure_grad_hooks: list[Any] = []
        self._drop_log = [0, 0, 0.0, 0]  # kept, seen, sum of thresholds, pools
        self._schedule_callback = BatchScheduleCallback()
        if self._schedule is not None:
            self._check_schedule_setup()
            self.callback_handler.callbacks.insert(0, self._schedule_callback)
        if self.args.drops_samples:
            if self.args.n_gpu > 1:
                raise ValueError("drop_fraction does not support torch.nn.DataParallel (n_gpu > 1): launch one process "
                                 "per device with torchrun or accelerate launch")
            # Our compute_loss returns the loss normalized over the whole step (see the module docstring).
            self.loss_is_scaled_for_ga = True
        if self._expects_hf_cblr_optimizer():
            self.add_callback(OptimizerCheckCallback())
            if self.is_deepspeed_enabled:
                prepare_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if (self.is_deepspeed_enabled and self.args.batch_size_lr_scaling != "none"
                and "scheduler" in self.accelerator.state.deepspeed_plugin.deepspeed_config):
            raise ValueError("batch_size_lr_scaling rescales the Trainer's learning-rate schedule: remove the "
                             "\"scheduler\" section of the DeepSpeed config, or set batch_size_lr_scaling='none'")

    @property
    def optimizer_name(self) -> str:
        """The name of the optimizer that trains: the DeepSpeed config section's hf_cblr optimizer, else ``args.optim``."""
        return self._config_optimizer[0] if self._config_optimizer is not None else str(self.args.optim)

    def _pop_deepspeed_optimizer_section(self) -> tuple[str, dict[str, Any]] | None:
        """Our ``"optimizer"`` section of the DeepSpeed config, popped before ``deepspeed_init`` hands DeepSpeed a
        ``DummyOptim`` for it: the registry name and the keyword arguments to build it with. The config dict is
        the training arguments' own, so the popped section is kept on them for any later Trainer built on them."""
        spec = pop_optimizer_section(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if spec is None:
            spec = getattr(self.args, _POPPED_SECTION, None)
        if spec is None:
            return None
        setattr(self.args, _POPPED_SECTION, spec)
        spec = (spec[0], dict(spec[1]))
        name, params = spec
        if self._client_optimizer is not None or self.optimizer_cls_and_kwargs is not None:
            raise ValueError("the optimizer is given both in the DeepSpeed config (\"optimizer\" section) and to the Trainer "
                             "(optimizers= or optimizer_cls_and_kwargs=): give one")
        if self.args.uses_hf_cblr_optimizer and self.args.optim != name:
            raise ValueError(f"optim={self.args.optim!r}, but the DeepSpeed config's \"optimizer\" section is {name!r}: "
                             "give one optimizer")
        # The decayed groups' weight decay is args.weight_decay, which transformers matched against the section's.
        params.pop("weight_decay", None)
        given = parse_optim_args(self.args.optim_args) if self.args.optim == name else {}
        clashes = sorted(key for key in params.keys() & given.keys() if params[key] != given[key])
        if clashes:
            raise ValueError(f"optim_args and the DeepSpeed config's \"optimizer\" section give different {clashes}: "
                             "give each argument once")
        kwargs = {**self.args.optimizer_kwargs(name), **params}
        check_optimizer_arguments(name, kwargs)
        return name, kwargs

    def _expects_hf_cblr_optimizer(self) -> bool:
        if self._config_optimizer is not None:
            return True
        if self._client_optimizer is not None:
            return isinstance(self._client_optimizer, CBLR)
        if self.optimizer_cls_and_kwargs is not None:
            cls = self.optimizer_cls_and_kwargs[0]
            return isinstance(cls, type) and issubclass(cls, CBLR)
        return self.args.uses_hf_cblr_optimizer

    def _check_schedule_setup(self) -> None:
        if self.train_dataset is not None and (isinstance(self.train_dataset, IterableDataset)
                                               or not hasattr(self.train_dataset, "__len__")):
            raise ValueError("batch_size_schedule needs a training set with a length (not an IterableDataset)")
        if self.args.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"batch_size_schedule samples its own batches: train_sampling_strategy="
                             f"{self.args.train_sampling_strategy!r} is not supported; valid values: {list(SAMPLING_STRATEGIES)}")
        if self.args.accelerator_config.split_batches:
            raise ValueError("batch_size_schedule needs accelerator_config.split_batches=False")
        if self.args.ignore_data_skip:
            raise ValueError("batch_size_schedule resumes by skipping the trained steps' batches of its sample stream: "
                             "ignore_data_skip=True is not supported")
        full = self.get_total_train_batch_size(self.args)
        validate_batch_size_schedule(self._schedule, full, full // self._train_batch_size)

    # -- optimizer and scheduler ----------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        if self.optimizer is None and self._client_optimizer is not None:
            # deepspeed_init sets trainer.optimizer to None and rebuilds it from args.optim (transformers#38753).
            self.optimizer = self._client_optimizer
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and (
                self._config_optimizer is not None or self.args.uses_hf_cblr_optimizer):
            self.optimizer = self._create_hf_cblr_optimizer(self.model if model is None else model)
        optimizer = super().create_optimizer(model)
        self._install_closure(optimizer)
        ours = find_optimizer(optimizer)
        if ours is not None and self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage > 0:
            check_zero_support(ours.estimator)
        return optimizer

    def _create_hf_cblr_optimizer(self, model: nn.Module) -> Optimizer:
        """Our optimizer on groups split by (Trainer decay mask, hf_cblr adaptation mask), with parameter names."""
        optimizer_name, kwargs = self._config_optimizer or (self.args.optim, self.args.optimizer_kwargs())
        info = get_optimizer_info(optimizer_name)
        decayed = set(self.get_decay_parameter_names(model))
        adapted = {name for group in param_groups(model) if group["adaptation_mask"] for name, _ in group["params"]}
        members: dict[tuple[bool, bool], list[tuple[str, nn.Parameter]]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                members.setdefault((name in decayed, name in adapted), []).append((name, param))
        groups = [
            {"params": named, "weight_decay": self.args.weight_decay if decay else 0.0, "weight_decay_mask": decay,
             "adaptation_mask": adapt}
            for (decay, adapt), named in sorted(members.items(), reverse=True)
        ]
        return info.optimizer_class(groups, **{**info.defaults, **kwargs})

    def create_scheduler(self, num_training_steps: int, optimizer: Optimizer | None = None) -> LRScheduler:
        if self.lr_scheduler is None and self._client_lr_scheduler is not None:
            self.lr_scheduler = self._client_lr_scheduler  # dropped by deepspeed_init as the optimizer is
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.args.batch_size_lr_scaling != "none" and not getattr(scheduler, "_hf_cblr_batch_scaled", False):
            self._scale_learning_rate(scheduler)
        return scheduler

    def _scale_learning_rate(self, scheduler: LRScheduler) -> None:
        """Multiply every ``lr_lambda`` of the LambdaLR by the scheduled batch's ``lr_scale`` at that step."""
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(f"batch_size_lr_scaling={self.args.batch_size_lr_scaling!r} needs a LambdaLR schedule; "
                             f"{type(scheduler).__name__} is not one: choose another lr_scheduler_type, or 'none'")
        if self._plan is None:
            raise RuntimeError("batch_size_lr_scaling needs the batch-size plan: call get_train_dataloader first")
        full = self.get_total_train_batch_size(self.args)
        factors = [lr_scale(size, full, self.args.batch_size_lr_scaling) for size in self._plan]

        def scaled(lr_lambda: Any) -> Any:
            return lambda step: lr_lambda(step) * factors[min(step, len(factors) - 1)]

        scheduler.lr_lambdas = [scaled(lr_lambda) for lr_lambda in scheduler.lr_lambdas]
        for group, base_lr, lr_lambda in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas,
                                             strict=True):
            group["lr"] = base_lr * lr_lambda(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        scheduler._hf_cblr_batch_scaled = True

    # -- batch-size schedule --------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self._schedule is None:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self.data_collator
        strategy = self.args.train_sampling_strategy
        lengths = self._sample_lengths(dataset) if strategy == GROUP_BY_LENGTH else None
        if is_datasets_available() and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        full = self.get_total_train_batch_size(self.args)
        if self.args.max_steps > 0:
            self._plan = batch_size_plan(self._schedule, full, max_steps=self.args.max_steps)
        else:
            self._plan = batch_size_plan(self._schedule, full,
                                         total_samples=math.ceil(self.args.num_train_epochs * len(dataset)))
        self._consumed = consumed_samples(self._plan)
        self._schedule_callback.configure(self._plan, len(dataset))
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = ScheduledBatchSampler(len(dataset), self._plan, full // self._train_batch_size, seed=seed,
                                        shuffle=strategy != "sequential", lengths=lengths)
        dataloader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            multiprocessing_context=self.args.dataloader_multiprocessing_context,
            prefetch_factor=self.args.dataloader_prefetch_factor,
            in_order=self.args.dataloader_in_order,
            worker_init_fn=partial(seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index),
        )
        return self.accelerator.prepare(dataloader)

    def _sample_lengths(self, dataset: Any) -> list[int]:
        """The token count of every training sample: the dataset's ``length_column_name`` column, else the length
        of its first model input (as transformers' ``LengthGroupedSampler``)."""
        column = self.args.length_column_name
        if is_datasets_available() and isinstance(dataset, datasets.Dataset) and column in dataset.column_names:
            return [int(length) for length in dataset[column]]
        names = getattr(self.processing_class, "model_input_names", None) or ["input_ids"]
        key = names[0]
        first = dataset[0]
        if not isinstance(first, Mapping) or key not in first:
            raise ValueError(f"train_sampling_strategy='group_by_length' needs each sample's length: the training set has "
                             f"no {column!r} column and its samples no {key!r}")
        if is_datasets_available() and isinstance(dataset, datasets.Dataset):
            return [len(ids) for ids in dataset[key]]
        return [len(dataset[i][key]) for i in range(len(dataset))]

    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader) -> tuple[Any, ...]:
        """Under a schedule: one loop epoch of ``len(plan)`` steps (``state.epoch`` is kept in data epochs)."""
        if self._plan is None:
            return super().set_initial_training_values(args, dataloader)
        max_steps = len(self._plan)
        num_examples = self._schedule_callback.num_samples
        return (1, max_steps, num_examples, self._consumed[-1], self.get_total_train_batch_size(args),
                max_steps * args.gradient_accumulation_steps, max_steps)

    # -- per-step bookkeeping, dropping ------------------------------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_state = _StepState()
        if self.args.drops_samples and batch_samples:
            self._plan_drops(self._step_state, batch_samples, device)
        return batch_samples, num_items_in_batch

    def _plan_drops(self, step: _StepState, batch_samples: list[dict[str, Any]], device: torch.device) -> None:
        """Pool sizes of every micro-step on every rank, and the step's loss scale ``W / K``."""
        local = torch.tensor([_num_samples(batch) for batch in batch_samples], device=device)
        world_size = _world_size()
        if world_size > 1:
            gathered = [torch.empty_like(local) for _ in range(world_size)]
            dist.all_gather(gathered, local)
            local = torch.stack(gathered)
        else:
            local = local.unsqueeze(0)
        step.pool_sizes = local.T.tolist()
        step.drop_fraction = drop_fraction_at(self.state.global_step, self.state.max_steps, self.args.drop_fraction,
                                              self.args.drop_fraction_end, self.args.drop_warmup_steps)
        step.loss_scale = world_size / sum(num_kept(sum(sizes), step.drop_fraction) for sizes in step.pool_sizes)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        step = self._step_state
        if return_outputs or not model.training or step is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.args.drops_samples:
            return self._selective_loss(model, inputs, step)
        rng_state = self._rng_state_for_replay()
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if rng_state is not None:
            step.replays.append(_Replay(inputs, rng_state, 1.0 / self._gradient_accumulation_divisor(num_items_in_batch),
                                        num_items_in_batch=num_items_in_batch))
        return loss

    def per_sample_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """One loss per sample of ``inputs`` (a forward of ``model``); override for custom losses.

        The default reads ``logits`` from the outputs and ``labels`` from the inputs, and follows the
        model's ``config.problem_type`` and causal-LM label shift (see
        :func:`~hf_cblr.trainer.sample_selection.per_sample_loss`).
        """
        if "labels" not in inputs:
            raise ValueError("drop_fraction needs per-sample losses: the batch has no 'labels'; override "
                             "CBLRTrainer.per_sample_loss for this model")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        return per_sample_loss(logits, inputs["labels"], problem_type=getattr(config, "problem_type", None),
                               shift_labels=bool(getattr(self, "_loss_shifts_labels", False)))

    def _selective_loss(self, model: nn.Module, inputs: dict[str, Any], step: _StepState) -> Tensor:
        """``(W / K) x`` the sum of this rank's kept per-sample losses of the current micro-step."""
        micro_step = step.micro_step
        step.micro_step += 1
        if self.args.drop_scoring == "with_grad":
            rng_state = self._rng_state_for_replay()
            losses = self.per_sample_loss(model, inputs)
            kept = self._select(losses.detach(), step, micro_step)
            if rng_state is not None:
                step.replays.append(_Replay(inputs, rng_state, step.loss_scale, rows=kept))
            return losses[kept].sum() * step.loss_scale
        with torch.no_grad():
            scores = self.per_sample_loss(model, inputs)
        kept = self._select(scores, step, micro_step)
        # A rank that keeps nothing still runs a forward and backward (weight 0), as DDP and DeepSpeed expect.
        weight = step.loss_scale if kept.numel() else 0.0
        rows = kept if kept.numel() else kept.new_zeros(1)
        kept_inputs = _select_rows(inputs, rows, len(scores))
        rng_state = self._rng_state_for_replay()
        loss = self.per_sample_loss(model, kept_inputs).sum() * weight
        if rng_state is not None:
            step.replays.append(_Replay(kept_inputs, rng_state, weight, rows=torch.arange(len(rows), device=rows.device)))
        return loss

    def _select(self, scores: Tensor, step: _StepState, micro_step: int) -> Tensor:
        """Indices (into this rank's micro-batch) of the samples kept in the pool of ``micro_step``."""
        sizes = step.pool_sizes[micro_step]
        pool = scores.float()
        if len(sizes) > 1:
            padded = pool.new_zeros(max(sizes))
            padded[: len(pool)] = pool
            gathered = [torch.empty_like(padded) for _ in sizes]
            dist.all_gather(gathered, padded)
            pool = torch.cat([values[:size] for values, size in zip(gathered, sizes, strict=True)])
        pool = pool.cpu()
        generator = torch.Generator().manual_seed(hash((self.args.seed, self.state.global_step, micro_step)) & (2**63 - 1))
        mask = select_kept(pool, step.drop_fraction, self.args.drop_selection, generator)
        self._drop_log[0] += int(mask.sum())
        self._drop_log[1] += len(pool)
        self._drop_log[2] += float(pool[mask].min())
        self._drop_log[3] += 1
        offset = sum(sizes[: _rank()])
        return mask[offset: offset + len(scores)].nonzero().squeeze(1).to(scores.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            if self._plan is not None and self.state.global_step:
                logs["global_batch_size"] = self._plan[self.state.global_step - 1]
                logs["consumed_samples"] = self._consumed[self.state.global_step]
            if self._drop_log[3]:
                kept, seen, thresholds, pools = self._drop_log
                logs["drop_fraction"] = self._step_state.drop_fraction if self._step_state is not None else 0.0
                logs["kept_fraction"] = kept / seen
                logs["drop_loss_threshold"] = thresholds / pools
                self._drop_log = [0, 0, 0.0, 0]
        super().log(logs, start_time)

    # -- the curvature closure --------------------------------------------------------------------------
    def _install_closure(self, optimizer: Optimizer) -> None:
        """Register the step hooks that hand a closure to our optimizer when its estimator needs one."""
        ours = find_optimizer(optimizer)
        if ours is None or not ours.estimator.needs_closure or id(ours) in self._closure_optimizers:
            return
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError(f"curvature={ours.curvature!r} needs optimizer.step(closure), which "
                             f"{'DeepSpeed' if self.is_deepspeed_enabled else 'FSDP'} never passes to the optimizer; "
                             "use curvature 'secant', 'secant_elementwise' or 'weight_norm', or train without it")
        if self.args.n_gpu > 1:
            raise ValueError(f"curvature={ours.curvature!r} does not support torch.nn.DataParallel (n_gpu > 1): launch "
                             "one process per device with torchrun or accelerate launch")
        ours.register_step_pre_hook(self._supply_closure)
        ours.register_step_post_hook(self._remove_closure_grad_hooks)
        self._closure_optimizers.add(id(ours))

    def _supply_closure(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if (args[1] if len(args) > 1 else kwargs.get("closure")) is not None:
            return None
        if _world_size() > 1:
            self._closure_grad_hooks = [param.register_hook(_AllReduceMean.apply) for group in optimizer.param_groups
                                        for param in group["params"] if param.requires_grad]
        return args[:1], {**kwargs, "closure": self._curvature_closure}

    def _remove_closure_grad_hooks(self, optimizer: Optimizer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        for handle in self._closure_grad_hooks:
            handle.remove()
        self._closure_grad_hooks = []

    def _curvature_closure(self) -> Tensor:
        """The current step's loss on this rank, re-evaluated without backward (see the module docstring)."""
        if self._step_state is None or not self._step_state.replays:
            raise RuntimeError("the curvature closure was called outside a training step of CBLRTrainer")
        model = self.accelerator.unwrap_model(self.model_wrapped)
        total: Tensor | None = None
        for replay in self._step_state.replays:
            devices = [replay.rng_state[1][0]] if replay.rng_state[1] is not None else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(replay.rng_state[0])
                if replay.rng_state[1] is not None:
                    torch.cuda.set_rng_state(replay.rng_state[1][1], replay.rng_state[1][0])
                if replay.rows is None:
                    loss = super().compute_loss(model, replay.inputs, num_items_in_batch=replay.num_items_in_batch)
                else:
                    loss = self.per_sample_loss(model, replay.inputs)[replay.rows].sum()
            loss = loss * replay.scale
            total = loss if total is None else total + loss
        return total

    def _rng_state_for_replay(self) -> Any:
        """The RNG state before a training forward, when the closure will need to replay it."""
        if not self._closure_optimizers:
            return None
        cuda = None
        if torch.cuda.is_available() and self.args.device.type == "cuda":
            index = self.args.device.index if self.args.device.index is not None else torch.cuda.current_device()
            cuda = (index, torch.cuda.get_rng_state(index))
        return torch.get_rng_state(), cuda

    def _gradient_accumulation_divisor(self, num_items_in_batch: Any) -> int:
        """What ``Trainer.training_step`` divides the ``compute_loss`` value by (mirrors its rule)."""
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return 1 if scaled else self.current_gradient_accumulation_steps


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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _num_samples(batch: Mapping[str, Any]) -> int:
    """The number of samples of a collated batch: the length of its labels (or of its first tensor)."""
    if isinstance(batch.get("labels"), Tensor):
        return len(batch["labels"])
    return next(len(value) for value in batch.values() if isinstance(value, Tensor) and value.ndim)


def _select_rows(inputs: dict[str, Any], rows: Tensor, batch_size: int) -> dict[str, Any]:
    """The rows ``rows`` of every tensor of ``inputs`` whose first dimension is the batch."""
    return {key: value[rows.to(value.device)] if isinstance(value, Tensor) and value.ndim and len(value) == batch_size
            else value for key, value in inputs.items()}
