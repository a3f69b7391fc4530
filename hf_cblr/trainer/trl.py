"""trl's ``SFTTrainer`` with the hf_cblr optimizers, batch-size ramping, small-loss dropping and the curvature closure.

``CBLRSFTTrainer`` is :class:`~hf_cblr.trainer.trainer.CBLRMixin`, the hooks of ``CBLRTrainer``, over
``trl.SFTTrainer``; ``CBLRSFTConfig`` is :class:`~hf_cblr.trainer.arguments.CBLRTrainingArguments` over
``trl.SFTConfig``. The structure probes (:class:`~hf_cblr.diagnostics.StructureProbeCallback`) are a callback, and
work with either trainer. Importing this module imports trl (``pip install hf-cblr[trl]``).

Where no sample is dropped, ``SFTTrainer.compute_loss`` computes the loss (its fused LM head, its entropy and token
accuracy metrics). With ``drop_fraction``, the loss of a step is the mean over its kept samples of each sample's mean
token loss (:meth:`~hf_cblr.trainer.trainer.CBLRMixin.per_sample_loss`, the causal-LM label shift), which weighs
every kept sample alike where ``SFTTrainer`` weighs every token alike; the token metrics of ``SFTTrainer`` are then not
logged (its ``compute_loss`` does not run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer
from trl import SFTConfig, SFTTrainer

from hf_cblr.integrations.transformers import find_optimizer
from hf_cblr.trainer.arguments import CBLRTrainingArguments
from hf_cblr.trainer.trainer import CBLRMixin


def _sft_default(name: str) -> Any:
    """``SFTConfig``'s field ``name`` (its default and help), for a field that trl gives another default than
    ``TrainingArguments``: ``CBLRTrainingArguments``, which comes first among the bases, would otherwise bring back
    transformers' default."""
    sft_field = SFTConfig.__dataclass_fields__[name]
    return field(default=sft_field.default, metadata=sft_field.metadata)


@dataclass
class CBLRSFTConfig(CBLRTrainingArguments, SFTConfig):
    """``trl.SFTConfig`` plus the arguments of :class:`~hf_cblr.trainer.arguments.CBLRTrainingArguments` (``optim``
    an hf_cblr optimizer, ``batch_size_schedule``, ``drop_fraction`` ...), checked as there.

    trl's defaults stand (``bf16`` unless ``fp16``, ``gradient_checkpointing=True``, ``logging_steps=10``,
    ``max_length=1024`` ...) but one: without ``learning_rate``, an hf_cblr optimizer takes the learning rate the
    registry recommends for it (a stock optimizer, transformers' 5e-5), not ``SFTConfig``'s 2e-5.
    """

    bf16: bool | None = _sft_default("bf16")
    gradient_checkpointing: bool = _sft_default("gradient_checkpointing")
    logging_steps: float = _sft_default("logging_steps")


class CBLRSFTTrainer(CBLRMixin, SFTTrainer):
    """``trl.SFTTrainer`` with the hooks of :class:`~hf_cblr.trainer.trainer.CBLRMixin`, for :class:`CBLRSFTConfig`.

    Small-loss dropping needs one row per sample: it refuses ``padding_free`` batches (``padding_free=True``, or
    ``packing`` with a ``bfd`` strategy), and a ``loss_type`` other than ``"nll"`` (the per-sample losses are the
    negative log-likelihood). The curvature closure (``hvp``, ``fd``, ``hutchinson``) replays the model's own loss
    (:meth:`trainer_loss`), and so also needs ``loss_type="nll"``.
    """

    args: CBLRSFTConfig

    def __init__(self, model: Any, args: CBLRSFTConfig, *trainer_args: Any, **kwargs: Any) -> None:
        if not isinstance(args, CBLRSFTConfig):
            raise TypeError(f"CBLRSFTTrainer needs args=CBLRSFTConfig(...), got {type(args).__name__}")
        super().__init__(model, args, *trainer_args, **kwargs)
        if self.args.drops_samples:
            if self.padding_free:
                raise ValueError("drop_fraction needs one row per sample, and padding-free batches (padding_free=True, "
                                 "or packing with packing_strategy 'bfd' or 'bfd_split') put all samples in one row: "
                                 "set padding_free=False and packing=False, or packing_strategy='wrapped'")
            if self.args.loss_type != "nll":
                raise ValueError(f"drop_fraction scores and trains on each sample's negative log-likelihood, so "
                                 f"loss_type={self.args.loss_type!r} is not supported with it; valid value: 'nll'")

    def create_optimizer(self, model: nn.Module | None = None) -> Optimizer:
        optimizer = super().create_optimizer(model)
        if self._closure.active and self.args.loss_type != "nll":
            raise ValueError(f"the curvature closure re-evaluates the model's own loss, the negative log-likelihood, so "
                             f"loss_type={self.args.loss_type!r} is not supported with curvature="
                             f"{find_optimizer(optimizer).curvature!r}; valid value: 'nll'")
        return optimizer

    def trainer_loss(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """The loss the closure replays: ``transformers.Trainer.compute_loss``, the model's own loss, which equals
        ``SFTTrainer.compute_loss``'s for ``loss_type="nll"`` (label smoothing and ``compute_loss_func`` included).

        ``SFTTrainer.compute_loss`` is not replayed: its fused LM head has no double backward (the ``hvp`` and
        ``hutchinson`` estimators differentiate the closure's gradient), and it would log the replay as training.
        """
        return Trainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
