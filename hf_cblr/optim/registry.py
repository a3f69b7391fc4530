"""The optimizer registry and factory, in the style of ``timm.optim``.

Each name maps to an :class:`OptimInfo`: the class, the defaults that make the name what it is
(``base``, ``curvature``...), and flags. :func:`create_optimizer` builds one from a model (grouped
by :func:`~hf_cblr.optim.param_groups.param_groups`) or from parameters.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.optim import Optimizer

from hf_cblr.optim.cblr import CBLR
from hf_cblr.optim.config import CBLRConfig
from hf_cblr.optim.lamb import LAMB
from hf_cblr.optim.lars import LARS
from hf_cblr.optim.mclr import MCLR
from hf_cblr.optim.param_groups import param_groups


@dataclass(frozen=True)
class OptimInfo:
    """One registry entry."""

    name: str
    optimizer_class: type[Optimizer]
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    #: The base direction: ``sgd`` (momentum SGD) or ``adam``.
    base: str = "sgd"
    #: The learning rate the docs recommend with the default settings: the best on SST-2 dev at a fixed global batch
    #: of 1024 in ``docs/study.md`` (None: not measured there). ``configs/recipes/large_batch.yaml`` (a batch ramp)
    #: takes its own.
    recommended_lr: float | None = None
    #: Settings the study chose for this name (``docs/study.md``), which the caller's arguments override, unlike
    #: ``defaults``, which make the name what it is.
    recommended: dict[str, Any] = field(default_factory=dict)

    def valid_kwargs(self) -> list[str]:
        """Keyword arguments the optimizer accepts (beyond ``params``): those of its ``cblr_arguments``."""
        names: set[str] = set()
        for cls in (cls for cls in self.optimizer_class.__mro__ if issubclass(cls, CBLR)):
            parameters = inspect.signature(cls.cblr_arguments).parameters.values()
            names |= {p.name for p in parameters if p.kind is p.KEYWORD_ONLY}
            if not any(p.kind is p.VAR_KEYWORD for p in parameters):
                break
        return sorted(names - set(self.defaults))

    def arguments(self, **kwargs: Any) -> dict[str, Any]:
        """The keyword arguments the entry builds its optimizer with: its ``recommended`` settings, its ``defaults``,
        then ``kwargs``."""
        return {**self.recommended, **self.defaults, **kwargs}

    def config(self, **kwargs: Any) -> CBLRConfig:
        """The validated settings of this optimizer with ``kwargs`` over the entry's defaults, without building it."""
        check_optimizer_kwargs(self.name, kwargs)
        return self.optimizer_class.config(**self.arguments(**kwargs))


_REGISTRY: dict[str, OptimInfo] = {}


def register_optimizer(info: OptimInfo) -> OptimInfo:
    _REGISTRY[info.name] = info
    return info


register_optimizer(OptimInfo("cblr", CBLR, "curvature-based layer rate on momentum SGD (the paper's CBLR)",
                             {"base": "sgd"}))
register_optimizer(OptimInfo("mclr", MCLR, "median-curvature layer rate on momentum SGD (the paper's MCLR)",
                             {"base": "sgd"}))
register_optimizer(OptimInfo("lars", LARS, "LARS = CBLR with the weight-norm curvature, momentum SGD"))
# On the Adam base the curvature that every estimator measures rises over a fine-tune, which CBLR's absolute rule turns
# into rates falling on top of the lr schedule; the median rule cancels that common drift. Of the per-layer curvatures
# measured under it (docs/study.md, "The default of cblr_adam"), only the median of element-wise secants reached LAMB at
# batch 1024 (5 seeds: 0.812 +- 0.010 against 0.806 +- 0.011; the pooled layer secant 0.798 +- 0.009), so the registry's
# cblr_adam takes it: the same update as mclr_adam, which fixes what cblr_adam lets the caller change. CBLR(base="adam")
# keeps the paper's rule.
register_optimizer(OptimInfo("cblr_adam", CBLR, "curvature-based layer rate on the Adam direction",
                             {"base": "adam"}, base="adam", recommended_lr=5e-4,
                             recommended={"curvature": "secant_elementwise", "aggregate": "median", "rate_rule": "median"}))
register_optimizer(OptimInfo("mclr_adam", MCLR, "median-curvature layer rate on the Adam direction",
                             {"base": "adam"}, base="adam", recommended_lr=5e-4))
register_optimizer(OptimInfo("lamb", LAMB, "LAMB = CBLR with the weight-norm curvature on the Adam direction",
                             base="adam", recommended_lr=5e-3))


def list_optimizers() -> list[str]:
    """The registered optimizer names."""
    return sorted(_REGISTRY)


def get_optimizer_info(name: str) -> OptimInfo:
    if name not in _REGISTRY:
        raise ValueError(f"optimizer name {name!r} is not registered; valid values: {list_optimizers()}")
    return _REGISTRY[name]


def check_optimizer_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``TypeError`` naming any keyword argument the optimizer ``name`` does not take."""
    info = get_optimizer_info(name)
    valid = info.valid_kwargs()
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise TypeError(f"optimizer {name!r} does not take argument(s) {unknown}; valid arguments: {valid}")


def create_optimizer(model_or_params: nn.Module | Any, name: str, **kwargs: Any) -> Optimizer:
    """Build the optimizer registered as ``name``.

    A ``nn.Module`` is grouped with :func:`~hf_cblr.optim.param_groups.param_groups` (biases and
    norm layers get neither weight decay nor a curvature rate); parameters, named parameters or
    groups are passed through as they are.
    """
    info = get_optimizer_info(name)
    check_optimizer_kwargs(name, kwargs)
    if isinstance(model_or_params, nn.Module):
        params = param_groups(model_or_params, weight_decay=kwargs.pop("weight_decay", 0.0))
    else:
        params = model_or_params
    return info.optimizer_class(params, **info.arguments(**kwargs))
