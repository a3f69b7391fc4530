"""Integrations with other libraries: ``transformers`` (plain ``Trainer`` users, DeepSpeed/Accelerate checks)."""

from hf_cblr.integrations.transformers import (
    OptimizerCheckCallback,
    check_optimizer_in_use,
    find_optimizer,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    prepare_deepspeed_config,
)

__all__ = [
    "OptimizerCheckCallback",
    "check_optimizer_in_use",
    "find_optimizer",
    "optimizer_cls_and_kwargs",
    "parse_optim_args",
    "prepare_deepspeed_config",
]
