r"""``CBLRTrainer``: the ``transformers.Trainer`` with the hf_cblr optimizers, batch-size ramping, small-loss dropping
and the closure that the ``hvp``/``fd``/``hutchinson`` curvature estimators need.

**Optimizer.** With ``optim`` an hf_cblr name, :meth:`CBLRTrainer.create_optimizer` builds it from
``learning_rate``, the Adam arguments and ``optim_args``, on named param groups: the Trainer's
decay/no-decay split (:meth:`~transformers.Trainer.get_decay_parameter_names`, ``weight_decay`` on
the decayed group) crossed with hf_cblr's adaptation mask (:func:`hf_cblr.param_groups`: biases
and norm layers get no layer rate). What trains is checked to be ours when training starts
(:class:`~hf_cblr.integrations.OptimizerCheckCallback`). Under DeepSpeed, a config section
``"optimizer": {"type": T, "params": {...}}`` with ``T`` one of
:data:`~hf_cblr.integrations.deepspeed.DEEPSPEED_OPTIMIZER_TYPES` (``"CBLR"``, ``"CBLRAdam"``, ``"MCLR"``,
``"MCLRAdam"``, ``"LARS"``, ``"HfCblrLAMB"``: one per registry optimizer) is taken out of the config (DeepSpeed
cannot build it) and built the same way, its ``params`` over ``optim_args`` (``"auto"`` values and the
checks against the training arguments are transformers'; without ``learning_rate``, the lr is the one the registry
recommends for ``T``); an optimizer instance passed as
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

**Small-loss dropping** (``drop_fraction`` ...): :mod:`hf_cblr.trainer.dropping`; the gradient is exactly that of
the kept samples' mean loss, on any number of ranks and micro-steps. Logged: ``drop_fraction``, ``kept_fraction``
(kept / seen since the last log) and ``drop_loss_threshold`` (the mean over pools of the smallest kept loss).

**Curvature closure** (``hvp``, ``fd``, ``hutchinson``): :mod:`hf_cblr.trainer.closure`.

**Layout.** The class keeps only hook overrides, each delegating to one component: the ramp
(:class:`~hf_cblr.trainer.batch_ramp.BatchRamp`), dropping (:class:`~hf_cblr.trainer.dropping.SmallLossDropping`),
the closure (:class:`~hf_cblr.trainer.closure.CurvatureClosure`) and the DeepSpeed section
(:func:`~hf_cblr.integrations.deepspeed.take_trainer_optimizer_section`). What it reads of transformers' private
members, where no public hook exists, is commented at each place: ``_remove_unused_columns`` and
``_get_collator_with_removed_columns`` (the stock column filtering, for our dataloader), ``_train_batch_size``
(the per-device micro-batch the loop uses), ``_loss_shifts_labels`` (whether the model's loss shifts labels, for
per-sample losses) and the rule by which ``training_step`` divides the loss by the accumulation steps
(:meth:`CBLRMixin._gradient_accumulation_divisor`).

The hooks live in :class:`CBLRMixin`, so that other ``Trainer`` subclasses get them too: ``CBLRTrainer`` is
``CBLRMixin`` over ``Trainer``, and :class:`~hf_cblr.trainer.trl.CBLRSFTTrainer` the same mixin over trl's
``SFTTrainer``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import seed_worker
from transformers.utils import is_datasets_available

from hf_cblr.diagnostics.layer_stats import LayerStatsCallback
from hf_cblr.hub import ModelCardCallback, save_trainer_model_card
from hf_cblr.integrations.deepspeed import take_trainer_optimizer_section
from hf_cblr.integrations.transformers import OptimizerCheckCallback, find_optimizer, prepare_deepspeed_config
from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.param_groups import param_groups
from hf_cblr.optim.partitioned import check_zero_support
from hf_cblr.optim.registry import get_optimizer_info
from hf_cblr.trainer.arguments import CBLRTrainingArguments
from hf_cblr.trainer.batch_ramp import GROUP_BY_LENGTH, BatchRamp, BatchScheduleCallback, BatchSizeScaledLR
from hf_cblr.trainer.batch_schedule import FullBatch
from hf_cblr.trainer.closure import CurvatureClosure
from hf_cblr.trainer.dropping import SmallLossDropping
from hf_cblr.trainer.run_settings import RunSettingsCallback
from hf_cblr.trainer.sample_selection import per_sample_loss

if is_datasets_available():
    import datasets


class CBLRMixin:
    """The hf_cblr hooks of a ``transformers.Trainer`` subclass, for :class:`CBLRTrainingArguments` (see the module
    docstring): put it first among the bases, ``class T(CBLRMixin, SomeTrainer)``, so that its hooks wrap the
    trainer's own (:class:`CBLRTrainer` over ``Trainer``, :class:`~hf_cblr.trainer.trl.CBLRSFTTrainer` over trl's
    ``SFTTrainer``). Each hook calls ``super()``, so the trainer's own ``compute_loss`` computes the loss where no
    sample is dropped.

    Overridden hooks: ``create_optimizer``, ``create_scheduler`` (client optimizer/scheduler kept under
    DeepSpeed; batch-size LR scaling), ``get_train_dataloader`` and ``set_initial_training_values``
    (the batch-size plan), ``get_batch_samples`` (per-step drop bookkeeping), ``compute_loss``
    (dropping; recording for the closure) and ``log``. Override :meth:`per_sample_loss` for losses
    other than those of :func:`~hf_cblr.trainer.sample_selection.per_sample_loss`. With ``report_to`` set, a
    :class:`~hf_cblr.diagnostics.LayerStatsCallback` puts the layer rates and curvatures in the reported logs.
    """

    args: CBLRTrainingArguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, CBLRTrainingArguments):
            raise TypeError(f"{type(self).__name__} needs CBLRTrainingArguments, got {type(self.args).__name__}")
        fsdp_requested = self.args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
        if fsdp_requested and not self.is_fsdp_enabled:
            raise ValueError(
                "FSDP was requested (the fsdp training arguments, or an accelerate launch config with distributed_type "
                f"FSDP), but Accelerate set up {self.accelerator.distributed_type}: it runs FSDP only on accelerators "
                "(GPU, XPU, NPU, HPU, ...), and on CPU processes it drops the FSDP plugin and wraps the model in "
                "DistributedDataParallel, unsharded. Train on accelerators, or on the CPU use DeepSpeed ZeRO "
                "(configs/accelerate/deepspeed_zero*.yaml, DS_ACCELERATOR=cpu), DDP (configs/accelerate/cpu_2proc.yaml) "
                "or torch.distributed.fsdp.fully_shard from code (docs/sharding.md)"
            )
        self._client_optimizer, self._client_lr_scheduler = self.optimizer, self.lr_scheduler
        #: (registry name, kwargs) of the DeepSpeed config's hf_cblr "optimizer" section, taken out of the config
        self._config_optimizer = take_trainer_optimizer_section(
            self.args, self.accelerator.state.deepspeed_plugin.deepspeed_config,
            optimizer_given=self._client_optimizer is not None or self.optimizer_cls_and_kwargs is not None,
        ) if self.is_deepspeed_enabled else None
        schedule = self.args.parsed_batch_size_schedule()
        if schedule is None and self.args.train_sampling_strategy == GROUP_BY_LENGTH:
            schedule = FullBatch()  # our sampler: random global batches cut into length-sorted micro-batches
        self._ramp = BatchRamp(schedule) if schedule is not None else None
        self._closure = CurvatureClosure(self)
        self._dropping = SmallLossDropping(self.args) if self.args.drops_samples else None
        if self._ramp is not None:
            # _train_batch_size (private): the per-device micro-batch size the loop uses.
            self._ramp.check_setup(self.train_dataset, self.args, self.get_total_train_batch_size(self.args),
                                   self._train_batch_size)
            self.callback_handler.callbacks.insert(0, BatchScheduleCallback(self._ramp))
        if self._dropping is not None:
            if self.args.n_gpu > 1:
                raise ValueError("drop_fraction does not support torch.nn.DataParallel (n_gpu > 1): launch one process "
                                 "per device with torchrun or accelerate launch")
            # Our compute_loss returns the loss normalized over the whole step (hf_cblr.trainer.dropping).
            self.loss_is_scaled_for_ga = True
        self.add_callback(RunSettingsCallback())
        self.add_callback(ModelCardCallback(self))  # the hf_cblr card in hub_strategy checkpoint pushes
        if self.args.report_to:  # the reporting integrations (tensorboard, ...) get the per-layer rates and curvatures
            LayerStatsCallback().attach(self)
        if self._expects_hf_cblr_optimizer():
            self.add_callback(OptimizerCheckCallback())
            if self.is_deepspeed_enabled:
                prepare_deepspeed_config(self.accelerator.state.deepspeed_plugin.deepspeed_config)
        if (self.is_deepspeed_enabled and self.args.batch_size_lr_scaling != "none"
                and "scheduler" in self.accelerator.state.deepspeed_plugin.deepspeed_config):
            raise ValueError("batch_size_lr_scaling rescales the Trainer's learning-rate schedule: remove the "
                             "\"scheduler\" section of the DeepSpeed config, or set batch_size_lr_scaling='none'")

    @property
    def batch_ramp(self) -> BatchRamp | None:
        """The run's batch-size plan and consumed samples (None without a schedule or length grouping)."""
        return self._ramp

    @property
    def optimizer_name(self) -> str:
        """The name of the optimizer that trains: the DeepSpeed config section's hf_cblr optimizer, else ``args.optim``."""
        return self._config_optimizer[0] if self._config_optimizer is not None else str(self.args.optim)

    def _expects_hf_cblr_optimizer(self) -> bool:
        if self._config_optimizer is not None:
            return True
        if self._client_optimizer is not None:
            return isinstance(self._client_optimizer, CBLR)
        if self.optimizer_cls_and_kwargs is not None:
            cls = self.optimizer_cls_and_kwargs[0]
            return isinstance(cls, type) and issubclass(cls, CBLR)
        return self.args.uses_hf_cblr_optimizer

    # -- optimizer and scheduler ----------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        if self.optimizer is None and self._client_optimizer is not None:
            # deepspeed_init sets trainer.optimizer to None and rebuilds it from args.optim (transformers#38753).
            self.optimizer = self._client_optimizer
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None and (
                self._config_optimizer is not None or self.args.uses_hf_cblr_optimizer):
            self.optimizer = self._create_hf_cblr_optimizer(self.model if model is None else model)
        optimizer = super().create_optimizer(model)
        self._closure.install(optimizer)
        ours = find_optimizer(optimizer)
        if ours is not None and self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage > 0:
            check_zero_support(ours.estimator)
        return optimizer

    def _create_hf_cblr_optimizer(self, model: nn.Module) -> Optimizer:
        """Our optimizer on groups split by (Trainer decay mask, hf_cblr adaptation mask), with parameter names."""
        optimizer_name, kwargs = self._config_optimizer or (self.args.optim, self.args.optimizer_kwargs())
        info = get_optimizer_info(optimizer_name)
        groups = param_groups(model, self.args.weight_decay, decayed=set(self.get_decay_parameter_names(model)))
        return info.optimizer_class(groups, **info.arguments(**kwargs))

    def create_scheduler(self, num_training_steps: int, optimizer: Optimizer | None = None) -> LRScheduler:
        if self.lr_scheduler is None and self._client_lr_scheduler is not None:
            self.lr_scheduler = self._client_lr_scheduler  # dropped by deepspeed_init as the optimizer is
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        scaling = self.args.batch_size_lr_scaling
        if scaling != "none" and not isinstance(scheduler, BatchSizeScaledLR):
            if self._ramp is None:
                raise RuntimeError("batch_size_lr_scaling needs the batch-size plan: call get_train_dataloader first")
            self.lr_scheduler = scheduler = self._ramp.scaled_scheduler(scheduler, scaling,
                                                                        self.get_total_train_batch_size(self.args))
        return scheduler

    # -- batch-size schedule --------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        if self._ramp is None:
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset, collator = self.train_dataset, self.data_collator
        strategy = self.args.train_sampling_strategy
        lengths = self._sample_lengths(dataset) if strategy == GROUP_BY_LENGTH else None
        # _remove_unused_columns / _get_collator_with_removed_columns (private): the stock column filtering.
        if is_datasets_available() and isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description="Training")
        else:
            collator = self._get_collator_with_removed_columns(collator, description="Training")
        full = self.get_total_train_batch_size(self.args)
        self._ramp.make_plan(full, len(dataset), max_steps=self.args.max_steps, num_train_epochs=self.args.num_train_epochs)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        sampler = self._ramp.sampler(full // self._train_batch_size, seed=seed, shuffle=strategy != "sequential",
                                     lengths=lengths)
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
        if self._ramp is None or self._ramp.plan is None:
            return super().set_initial_training_values(args, dataloader)
        return self._ramp.training_values(args, self.get_total_train_batch_size(args))

    # -- per-step bookkeeping, dropping, recording for the closure ------------------------------------------
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._closure.new_step()
        if self._dropping is not None and batch_samples:
            self._dropping.plan(batch_samples, device, self.state.global_step, self.state.max_steps)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if return_outputs or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self._dropping is not None and self._dropping.step is not None:  # in the training loop
            return self._dropping.loss(inputs, partial(self.per_sample_loss, model), self.state.global_step,
                                       self._closure.begin)
        finish = self._closure.begin(inputs, num_items_in_batch)
        loss = super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        if finish is not None:
            finish(1.0 / self._gradient_accumulation_divisor(num_items_in_batch))
        return loss

    def trainer_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """The trainer's own ``compute_loss`` (the base after the mixin; without dropping or recording), for the
        closure's replays."""
        return super().compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)

    def per_sample_loss(self, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
        """One loss per sample of ``inputs`` (a forward of ``model``); override for custom losses.

        The default reads ``logits`` from the outputs and ``labels`` from the inputs, and follows the
        model's ``config.problem_type`` and causal-LM label shift (see
        :func:`~hf_cblr.trainer.sample_selection.per_sample_loss`): a causal LM's sample loss is the mean
        token loss over its labels other than -100 (the collators' padding label), each label predicted
        from the position before it, so a sample's loss is the model's own loss on that sample alone. Labels the
        collator already shifted (a ``shift_labels`` input) are read as they are.
        """
        if "labels" not in inputs:
            raise ValueError(f"drop_fraction needs per-sample losses: the batch has no 'labels'; override "
                             f"{type(self).__name__}.per_sample_loss for this model")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[1]
        config = getattr(self.accelerator.unwrap_model(model), "config", None)
        if "shift_labels" in inputs:  # labels already shifted by the collator, as the model's loss then reads them
            return per_sample_loss(logits, inputs["shift_labels"], problem_type=getattr(config, "problem_type", None))
        # _loss_shifts_labels (private): whether the model's own loss shifts the labels (causal LMs).
        return per_sample_loss(logits, inputs["labels"], problem_type=getattr(config, "problem_type", None),
                               shift_labels=bool(getattr(self, "_loss_shifts_labels", False)))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log
            if self._ramp is not None:
                logs.update(self._ramp.log_entries(self.state.global_step))
            if self._dropping is not None:
                logs.update(self._dropping.log_entries())
        super().log(logs, start_time)

    def _gradient_accumulation_divisor(self, num_items_in_batch: Any) -> int:
        """What ``Trainer.training_step`` divides the ``compute_loss`` value by: a copy of its rule, which has no
        public hook (transformers 5.25, ``Trainer.training_step``)."""
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return 1 if scaled else self.current_gradient_accumulation_steps

    def create_model_card(self, language: str | None = None, license: str | None = None,
                          tags: str | list[str] | None = None, model_name: str | None = None,
                          finetuned_from: str | None = None, tasks: str | list[str] | None = None,
                          dataset_tags: str | list[str] | None = None, dataset: str | list[str] | None = None,
                          dataset_args: str | list[str] | None = None) -> None:
        """Write the hf_cblr model card (:func:`~hf_cblr.hub.save_trainer_model_card`: the optimizer that trained,
        its hyperparameters, the batch-size and drop schedules, the precision the run used, the latest evaluation)
        as the output folder's ``README.md``, in place of transformers' draft, so that ``push_to_hub`` uploads it with
        the model in one commit. The arguments are ``Trainer.create_model_card``'s."""
        save_trainer_model_card(self, language=language, license=license, tags=tags, model_name=model_name,
                                finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                                dataset_args=dataset_args)


class CBLRTrainer(CBLRMixin, Trainer):
    """``transformers.Trainer`` with the hf_cblr optimizers, batch-size ramping, small-loss dropping and the curvature
    closure, for :class:`CBLRTrainingArguments`: the hooks of :class:`CBLRMixin` (see the module docstring)."""
