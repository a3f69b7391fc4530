"""``CBLRTrainingArguments``: ``TrainingArguments`` with the hf_cblr optimizers, batch-size schedules and sample dropping."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames
from transformers.utils import logging

from hf_cblr.integrations.deepspeed_types import deepspeed_type, trainer_deepspeed_optimizer
from hf_cblr.integrations.transformers import TRAINING_ARGUMENT_KEYS, check_optimizer_arguments, parse_optim_args
from hf_cblr.optim.config import check_number
from hf_cblr.optim.registry import get_optimizer_info, list_optimizers
from hf_cblr.trainer.batch_schedule import GRAMMAR, LR_SCALINGS, BatchSizeSchedule, parse_batch_size_schedule
from hf_cblr.trainer.sample_selection import DROP_SCORINGS, DROP_SELECTIONS

logger = logging.get_logger(__name__)

STOCK_OPTIMIZERS = [name.value for name in OptimizerNames]
#: ``learning_rate`` of transformers' ``TrainingArguments``, for the stock optimizers.
STOCK_DEFAULT_LEARNING_RATE = TrainingArguments.__dataclass_fields__["learning_rate"].default
#: Every value ``optim`` accepts: the hf_cblr registry, then the stock ``OptimizerNames``.
OPTIM_CHOICES = list_optimizers() + STOCK_OPTIMIZERS


def _check_choice(name: str, value: Any, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; valid values: {list(choices)}")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


@dataclass
class CBLRTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the hf_cblr optimizers, batch-size ramping and small-loss dropping.

    Every new value is checked here, when the arguments are built: a bad optimizer name, a bad
    ``optim_args`` key or value, a malformed schedule or an out-of-range fraction raises
    ``ValueError`` naming the argument and its valid values.
    """

    optim: str = field(
        default=TrainingArguments.__dataclass_fields__["optim"].default,
        metadata={
            "help": "The optimizer: an hf_cblr optimizer (" + ", ".join(list_optimizers()) + ") or any stock "
                    "transformers OptimizerNames value. The hf_cblr ones take their keyword arguments from optim_args, "
                    "learning_rate and weight_decay, and (Adam bases) adam_beta1/adam_beta2/adam_epsilon.",
            "choices": OPTIM_CHOICES,
        },
    )
    learning_rate: float | None = field(  # type: ignore[assignment]
        default=None,
        metadata={
            "help": "The initial learning rate. Default (None): for an hf_cblr optimizer, the learning rate the "
                    "registry recommends for it (measured in docs/study.md; an optimizer without one asks for "
                    "learning_rate), also where a DeepSpeed config's \"optimizer\" section names it; for a stock "
                    "optimizer, transformers' default 5e-5."
        },
    )
    optim_args: str | None = field(
        default=None,
        metadata={
            "help": "Optimizer keyword arguments 'key=value,...', typed: true/false, none, integers, floats, "
                    "'a:b' tuples (betas=0.9:0.999), else strings (curvature=hvp). For the hf_cblr optimizers: any "
                    "argument of the class but lr and weight_decay (use learning_rate and weight_decay)."
        },
    )
    batch_size_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Global batch size keyed to consumed samples: " + GRAMMAR + ". The full batch is "
                    "per_device_train_batch_size x world_size x gradient_accumulation_steps (the target of 'linear' "
                    "and the largest size allowed); every size must be a multiple of world_size x "
                    "gradient_accumulation_steps. None: the stock fixed batch."
        },
    )
    batch_size_lr_scaling: str = field(
        default="none",
        metadata={
            "help": "Learning-rate rescaling when the scheduled batch B differs from the full batch B_full: 'none', "
                    "'linear' (x B/B_full) or 'sqrt' (x sqrt(B/B_full)); learning_rate is the rate of the full batch.",
            "choices": list(LR_SCALINGS),
        },
    )
    drop_fraction: float = field(
        default=0.0,
        metadata={"help": "Fraction of each selection pool (the samples of one micro-step on all ranks) dropped as the "
                          "smallest losses; the gradient is that of the mean loss over the kept samples. In [0, 1)."},
    )
    drop_fraction_end: float | None = field(
        default=None,
        metadata={"help": "If set, the drop fraction goes linearly from drop_fraction (after the warm-up) to this value "
                          "at the last step. In [0, 1)."},
    )
    drop_warmup_steps: int = field(
        default=0,
        metadata={"help": "Optimizer steps over which the drop fraction ramps linearly from 0 to drop_fraction."},
    )
    drop_selection: str = field(
        default="topk",
        metadata={"help": "Which samples are kept: 'topk' (the largest losses) or 'sampled' (drawn by loss rank, as "
                          "SelectiveBackprop).", "choices": list(DROP_SELECTIONS)},
    )
    drop_scoring: str = field(
        default="with_grad",
        metadata={"help": "'with_grad': one forward with autograd, the dropped samples masked out of the loss; "
                          "'no_grad': score with a forward without autograd, then forward and backward the kept "
                          "samples only.", "choices": list(DROP_SCORINGS)},
    )

    def __post_init__(self) -> None:
        ours = self.optim in list_optimizers()
        if not ours and self.optim not in STOCK_OPTIMIZERS:
            raise ValueError(f"optim={self.optim!r} is not valid; valid values: {OPTIM_CHOICES}")
        # Without a learning rate, ours take the registry's recommendation: that of the optimizer that will be built,
        # the DeepSpeed config's hf_cblr section where there is one (its "auto" lr is filled from learning_rate in
        # super().__post_init__), else optim's. One without any is refused, after the other arguments are checked (so
        # that their errors come first).
        built = self._optimizer_built() if self.learning_rate is None else None
        recommended = get_optimizer_info(built).recommended_lr if built is not None else STOCK_DEFAULT_LEARNING_RATE
        missing_learning_rate = self.learning_rate is None and recommended is None
        if self.learning_rate is None:
            self.learning_rate = STOCK_DEFAULT_LEARNING_RATE if missing_learning_rate else recommended
            if built is not None and not missing_learning_rate:
                logger.info("learning_rate not given: %s takes its recommended learning rate %g (docs/study.md)",
                            self._describe_optimizer(built), recommended)
        if ours:
            name, self.optim = self.optim, OptimizerNames.ADAMW_TORCH.value
            try:
                super().__post_init__()
            finally:
                self.optim = name
            # weight_decay goes to the decayed param group, not through optimizer_kwargs: checked here.
            check_number("weight_decay", self.weight_decay, 0.0, math.inf, include_high=False)
            self.optimizer_kwargs()
        else:
            super().__post_init__()
        if self.batch_size_schedule is not None:
            self.parsed_batch_size_schedule()
        _check_choice("batch_size_lr_scaling", self.batch_size_lr_scaling, LR_SCALINGS)
        if self.batch_size_lr_scaling != "none" and self.batch_size_schedule is None:
            raise ValueError(f"batch_size_lr_scaling={self.batch_size_lr_scaling!r} needs a batch_size_schedule")
        _check_fraction("drop_fraction", self.drop_fraction)
        if self.drop_fraction_end is not None:
            _check_fraction("drop_fraction_end", self.drop_fraction_end)
        if isinstance(self.drop_warmup_steps, bool) or not isinstance(self.drop_warmup_steps, int) or self.drop_warmup_steps < 0:
            raise ValueError(f"drop_warmup_steps must be an integer >= 0, got {self.drop_warmup_steps!r}")
        _check_choice("drop_selection", self.drop_selection, DROP_SELECTIONS)
        _check_choice("drop_scoring", self.drop_scoring, DROP_SCORINGS)
        if missing_learning_rate:
            with_lr = [name for name in list_optimizers() if get_optimizer_info(name).recommended_lr is not None]
            raise ValueError(f"{self._describe_optimizer(built)} has no recommended learning rate (docs/study.md measured "
                             f"none that fine-tunes well): give learning_rate (the optimizers with one: {with_lr})")

    def _optimizer_built(self) -> str | None:
        """The registry name of the hf_cblr optimizer that training will build: that of the DeepSpeed config's
        ``"optimizer"`` section (``deepspeed``, or the config of an ``accelerate launch`` with DeepSpeed), else
        ``optim``; None for a stock optimizer."""
        return trainer_deepspeed_optimizer(self.deepspeed) or (self.optim if self.optim in list_optimizers() else None)

    def _describe_optimizer(self, name: str) -> str:
        """Where hf_cblr optimizer ``name`` comes from, for messages: ``optim``, or the DeepSpeed config."""
        if name == self.optim:
            return f"optim={name!r}"
        return f"the DeepSpeed config's \"optimizer\" type {deepspeed_type(name)!r} ({name})"

    @property
    def uses_hf_cblr_optimizer(self) -> bool:
        """Whether ``optim`` names an hf_cblr optimizer."""
        return self.optim in list_optimizers()

    @property
    def drops_samples(self) -> bool:
        """Whether any step drops samples (``drop_fraction`` or ``drop_fraction_end`` > 0)."""
        return self.drop_fraction > 0 or bool(self.drop_fraction_end)

    def optimizer_kwargs(self, name: str | None = None) -> dict[str, Any]:
        """The keyword arguments of hf_cblr optimizer ``name`` (default: ``optim``) from ``learning_rate``, the Adam
        arguments and, for ``optim`` itself, ``optim_args``.

        ``weight_decay`` is not among them: it goes to the decayed param group.
        """
        name = self.optim if name is None else name
        parsed = parse_optim_args(self.optim_args) if name == self.optim else {}
        for key, replacement in TRAINING_ARGUMENT_KEYS.items():
            if key in parsed:
                raise ValueError(f"optim_args must not set {key!r}: use the training argument {replacement} instead")
        info = get_optimizer_info(name)
        valid = info.valid_kwargs()
        kwargs: dict[str, Any] = {"lr": self.learning_rate}
        if info.base == "adam":
            kwargs.update({key: value for key, value in (("betas", (self.adam_beta1, self.adam_beta2)),
                                                          ("eps", self.adam_epsilon)) if key in valid})
        kwargs.update(parsed)
        check_optimizer_arguments(name, kwargs)
        return kwargs

    def parsed_batch_size_schedule(self) -> BatchSizeSchedule | None:
        """``batch_size_schedule`` parsed (None without one)."""
        return None if self.batch_size_schedule is None else parse_batch_size_schedule(self.batch_size_schedule)
