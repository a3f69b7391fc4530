"""The Hugging Face Trainer integration: ``CBLRTrainingArguments`` and ``CBLRTrainer``; with trl installed,
``CBLRSFTConfig`` and ``CBLRSFTTrainer`` (imported on first use, so that trl stays optional)."""

from importlib import import_module
from typing import Any

from hf_cblr.trainer.arguments import CBLRTrainingArguments
from hf_cblr.trainer.batch_ramp import BatchScheduleCallback
from hf_cblr.trainer.trainer import CBLRMixin, CBLRTrainer

_TRL = ("CBLRSFTConfig", "CBLRSFTTrainer")


def __getattr__(name: str) -> Any:
    if name in _TRL:
        return getattr(import_module("hf_cblr.trainer.trl"), name)
    raise AttributeError(f"module 'hf_cblr.trainer' has no attribute {name!r}")


__all__ = ["BatchScheduleCallback", "CBLRMixin", "CBLRTrainer", "CBLRTrainingArguments", *_TRL]
