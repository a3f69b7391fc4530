"""hf_cblr: curvature-based layer-wise learning rates for large-batch fine-tuning (arXiv 2012.08795).

The optimizers need only torch; the Hugging Face pieces (``CBLRTrainingArguments``, ``CBLRTrainer``,
``StructureProbeCallback``) import transformers on first use, and trl's (``CBLRSFTConfig``, ``CBLRSFTTrainer``) trl.
"""

from importlib import import_module
from typing import Any

from hf_cblr.optim import (
    CBLR,
    LAMB,
    LARS,
    MCLR,
    create_optimizer,
    get_optimizer_info,
    list_optimizers,
    param_groups,
)

__version__ = "0.1.0"

_LAZY = {
    "CBLRTrainingArguments": "hf_cblr.trainer",
    "CBLRTrainer": "hf_cblr.trainer",
    "CBLRSFTConfig": "hf_cblr.trainer.trl",
    "CBLRSFTTrainer": "hf_cblr.trainer.trl",
    "StructureProbeCallback": "hf_cblr.diagnostics",
    "optimizer_cls_and_kwargs": "hf_cblr.integrations",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_cblr' has no attribute {name!r}")


__all__ = ["CBLR", "LAMB", "LARS", "MCLR", "create_optimizer", "get_optimizer_info", "list_optimizers",
           "param_groups", "__version__", *_LAZY]
