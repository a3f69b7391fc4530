"""hf_cblr: curvature-based layer-wise learning rates for large-batch fine-tuning (arXiv 2012.08795)."""

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

__all__ = [
    "CBLR",
    "LAMB",
    "LARS",
    "MCLR",
    "__version__",
    "create_optimizer",
    "get_optimizer_info",
    "list_optimizers",
    "param_groups",
]
