"""The Hugging Face Trainer integration: ``CBLRTrainingArguments`` and ``CBLRTrainer``."""

from hf_cblr.trainer.arguments import CBLRTrainingArguments
from hf_cblr.trainer.batch_ramp import BatchScheduleCallback
from hf_cblr.trainer.trainer import CBLRTrainer

__all__ = ["BatchScheduleCallback", "CBLRTrainer", "CBLRTrainingArguments"]
