r"""The batch-size ramp of a ``CBLRTrainer`` run: the plan, its sampler, the epoch accounting and the lr scaling.

:class:`BatchRamp` is the one owner of a run's plan of global batch sizes and of its consumed-sample counts; the
trainer's hooks delegate to it (``get_train_dataloader``, ``set_initial_training_values``, ``create_scheduler``,
``log``), and :class:`BatchScheduleCallback` reads it to keep ``state.epoch`` in data epochs and to check a resumed
checkpoint. ``batch_size_lr_scaling`` wraps the Trainer's ``LambdaLR`` in :class:`BatchSizeScaledLR`, whose factors
at step :math:`k` are :math:`B_k / B_\text{full}` (or its square root). The schedule grammar, the plan and the
sampler themselves are :mod:`hf_cblr.trainer.batch_schedule`.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch.optim.lr_scheduler import LambdaLR, LRScheduler
from torch.utils.data import IterableDataset
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import IntervalStrategy, SaveStrategy

from hf_cblr.trainer.batch_schedule import (
    BatchSizeSchedule,
    ScheduledBatchSampler,
    batch_size_plan,
    consumed_samples,
    lr_scale,
    validate_batch_size_schedule,
)

GROUP_BY_LENGTH = "group_by_length"
#: The ``train_sampling_strategy`` values that the batch-size plan's sampler follows.
SAMPLING_STRATEGIES = ("random", "sequential", GROUP_BY_LENGTH)


class BatchRamp:
    """A run's plan of global batch sizes (fixed when training starts) and the samples consumed after each step."""

    def __init__(self, schedule: BatchSizeSchedule) -> None:
        self.schedule = schedule
        #: global batch size of every step; None before :meth:`make_plan`
        self.plan: list[int] | None = None
        #: samples consumed after ``k`` steps, ``consumed[0] = 0``
        self.consumed: list[int] = [0]
        #: samples in the training set (one data epoch)
        self.num_samples = 1

    def check_setup(self, train_dataset: Any, args: TrainingArguments, full_batch_size: int, micro_batch_size: int) -> None:
        """Refuse what the plan's sampler cannot follow, naming the argument."""
        if train_dataset is not None and (isinstance(train_dataset, IterableDataset) or not hasattr(train_dataset, "__len__")):
            raise ValueError("batch_size_schedule needs a training set with a length (not an IterableDataset)")
        if args.train_sampling_strategy not in SAMPLING_STRATEGIES:
            raise ValueError(f"batch_size_schedule samples its own batches: train_sampling_strategy="
                             f"{args.train_sampling_strategy!r} is not supported; valid values: {list(SAMPLING_STRATEGIES)}")
        if args.accelerator_config.split_batches:
            raise ValueError("batch_size_schedule needs accelerator_config.split_batches=False")
        if args.ignore_data_skip:
            raise ValueError("batch_size_schedule resumes by skipping the trained steps' batches of its sample stream: "
                             "ignore_data_skip=True is not supported")
        validate_batch_size_schedule(self.schedule, full_batch_size, full_batch_size // micro_batch_size)

    def make_plan(self, full_batch_size: int, num_samples: int, *, max_steps: int, num_train_epochs: float) -> None:
        """Fix the plan: ``max_steps`` steps when positive, else enough to consume ``num_train_epochs`` data epochs."""
        if max_steps > 0:
            self.plan = batch_size_plan(self.schedule, full_batch_size, max_steps=max_steps)
        else:
            self.plan = batch_size_plan(self.schedule, full_batch_size, total_samples=math.ceil(num_train_epochs * num_samples))
        self.consumed = consumed_samples(self.plan)
        self.num_samples = num_samples

    def sampler(self, micro_batches_per_step: int, *, seed: int, shuffle: bool,
                lengths: list[int] | None) -> ScheduledBatchSampler:
        assert self.plan is not None
        return ScheduledBatchSampler(self.num_samples, self.plan, micro_batches_per_step, seed=seed, shuffle=shuffle,
                                     lengths=lengths)

    def training_values(self, args: TrainingArguments, full_batch_size: int) -> tuple[Any, ...]:
        """``Trainer.set_initial_training_values``'s tuple: one loop epoch of ``len(plan)`` steps."""
        assert self.plan is not None
        max_steps = len(self.plan)
        return (1, max_steps, self.num_samples, self.consumed[-1], full_batch_size,
                max_steps * args.gradient_accumulation_steps, max_steps)

    def scaled_scheduler(self, scheduler: LRScheduler, scaling: str, full_batch_size: int) -> BatchSizeScaledLR:
        """``scheduler`` times the scheduled batch's ``lr_scale`` at every step (``batch_size_lr_scaling``)."""
        if not isinstance(scheduler, LambdaLR):
            raise ValueError(f"batch_size_lr_scaling={scaling!r} needs a LambdaLR schedule; "
                             f"{type(scheduler).__name__} is not one: choose another lr_scheduler_type, or 'none'")
        if self.plan is None:
            raise RuntimeError("batch_size_lr_scaling needs the batch-size plan: call get_train_dataloader first")
        return BatchSizeScaledLR(scheduler, [lr_scale(size, full_batch_size, scaling) for size in self.plan])

    def log_entries(self, global_step: int) -> dict[str, int]:
        """``global_batch_size`` (of the last step) and ``consumed_samples``, for a training log."""
        if self.plan is None or not global_step:
            return {}
        return {"global_batch_size": self.plan[global_step - 1], "consumed_samples": self.consumed[global_step]}


class BatchSizeScaledLR(LambdaLR):
    """A ``LambdaLR`` whose every factor is the wrapped one's times ``factors[step]`` (the last one past the end)."""

    def __init__(self, scheduler: LambdaLR, factors: list[float]) -> None:
        self.factors = factors
        # last_epoch - 1: the constructor's initial step brings it back to the wrapped scheduler's step.
        super().__init__(scheduler.optimizer, [partial(_scaled_factor, lr_lambda, factors) for lr_lambda in scheduler.lr_lambdas],
                         last_epoch=scheduler.last_epoch - 1)


def _scaled_factor(lr_lambda: Any, factors: list[float], step: int) -> float:
    return lr_lambda(step) * factors[min(step, len(factors) - 1)]


class BatchScheduleCallback(TrainerCallback, ExportableState):
    """Keeps ``state.epoch`` in data epochs under a batch-size schedule, fires ``"epoch"`` strategies, and
    saves the consumed samples in the checkpoint's trainer state (checked against the plan on resume)."""

    def __init__(self, ramp: BatchRamp | None = None) -> None:
        self.ramp = ramp if ramp is not None else BatchRamp(schedule=None)  # transformers may build it bare
        self.consumed_samples = 0

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"consumed_samples": self.consumed_samples}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        consumed = self.ramp.consumed
        self.consumed_samples = consumed[min(state.global_step, len(consumed) - 1)]
        saved = (state.stateful_callbacks or {}).get(type(self).__name__, {})
        saved = saved.get("attributes", {}).get("consumed_samples") if isinstance(saved, dict) else None
        if state.global_step and saved is not None and saved != self.consumed_samples:
            raise ValueError(
                f"the checkpoint consumed {saved} samples in {state.global_step} steps, but batch_size_schedule gives "
                f"{self.consumed_samples}: resume with the batch_size_schedule, per_device_train_batch_size, world size "
                "and gradient_accumulation_steps of the checkpoint's run"
            )
        state.num_train_epochs = math.ceil(consumed[-1] / self.ramp.num_samples)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        num_samples = self.ramp.num_samples
        before = self.consumed_samples // num_samples
        self.consumed_samples = self.ramp.consumed[state.global_step]
        state.epoch = self.consumed_samples / num_samples
        if self.consumed_samples // num_samples > before and state.global_step < state.max_steps:
            # A data epoch ended; the loop's own (single) epoch end covers the last step.
            control.should_log |= args.logging_strategy == IntervalStrategy.EPOCH
            control.should_evaluate |= args.eval_strategy == IntervalStrategy.EPOCH
            control.should_save |= args.save_strategy == SaveStrategy.EPOCH
