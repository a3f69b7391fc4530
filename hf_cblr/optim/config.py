"""The optimizers' settings as typed dataclasses, validated in ``__post_init__``: the one validation path.

:class:`GroupSettings` are the hyperparameters a param group may override (checked again for every group that is
added); :class:`CBLRConfig` adds the settings of the whole optimizer. The optimizer classes, the registry
(:meth:`~hf_cblr.optim.registry.OptimInfo.config`), ``optim_args``, the DeepSpeed config section and the Trainer all
build a :class:`CBLRConfig`, so a bad value fails with the same message wherever it comes from, without building an
optimizer. Every error names the argument and its valid values.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any

from hf_cblr.optim.directions import DIRECTIONS
from hf_cblr.optim.estimators import AGGREGATES, CURVATURE_ESTIMATORS
from hf_cblr.optim.partitioned import PartitionLayout
from hf_cblr.optim.rates import RATE_RULES

#: ``trust`` when none is given under the absolute rule (``rate_rule="inverse_curvature"``), per base: on the SGD base
#: with ``lr = 0.1`` a layer takes 1% of its Newton step; on the Adam base the value that fine-tunes MiniLM on SST-2
#: at batch 1024 with AdamW's ``lr = 5e-4`` (``secant_denoised``). Under the median rule ``trust`` is dimensionless
#: and defaults to 1: the layer of median curvature moves at ``lr``.
DEFAULT_TRUST = {"sgd": 0.1, "adam": 3000.0}
#: The group settings each base does not read (and its param groups do not carry).
BASE_UNUSED_SETTINGS = {"sgd": ("betas", "eps"), "adam": ("momentum", "dampening", "nesterov")}


def check_number(name: str, value: Any, low: float, high: float, *, include_low: bool = True,
                 include_high: bool = True) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is a finite number in the interval (numpy scalars too)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    above_low = value >= low if include_low else value > low
    below_high = value <= high if include_high else value < high
    if math.isnan(value) or not above_low or not below_high:
        interval = f"{'[' if include_low else '('}{low}, {high}{']' if include_high else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_mask(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be None (tensors with ndim > 1), True or False, got {value!r}")


@dataclass
class GroupSettings:
    """The hyperparameters of one param group (``CBLR``'s arguments of the same names)."""

    lr: float = 0.1
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    trust: float | None = None
    curvature_ema: float = 0.9
    curvature_eps: float = 1e-8
    max_ratio: float = 10.0
    min_ratio: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay_mask: bool | None = None
    adaptation_mask: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.betas, (tuple, list)):
            self.betas = tuple(_as_python_number(beta) for beta in self.betas)
        for f in fields(GroupSettings):
            setattr(self, f.name, _as_python_number(getattr(self, f.name)))
        check_number("lr", self.lr, 0.0, math.inf, include_high=False)
        check_number("momentum", self.momentum, 0.0, 1.0, include_high=False)
        check_number("dampening", self.dampening, 0.0, 1.0)
        check_number("weight_decay", self.weight_decay, 0.0, math.inf, include_high=False)
        check_number("trust", self.trust, 0.0, math.inf, include_low=False, include_high=False)
        check_number("curvature_ema", self.curvature_ema, 0.0, 1.0, include_high=False)
        check_number("curvature_eps", self.curvature_eps, 0.0, math.inf, include_high=False)
        check_number("max_ratio", self.max_ratio, 0.0, math.inf, include_low=False)
        check_number("min_ratio", self.min_ratio, 0.0, self.max_ratio)
        check_number("eps", self.eps, 0.0, math.inf, include_high=False)
        if not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        check_number("betas[0]", self.betas[0], 0.0, 1.0, include_high=False)
        check_number("betas[1]", self.betas[1], 0.0, 1.0, include_high=False)
        if not isinstance(self.nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov=True requires momentum > 0 and dampening = 0")
        _check_mask("weight_decay_mask", self.weight_decay_mask)
        _check_mask("adaptation_mask", self.adaptation_mask)

    @classmethod
    def of_group(cls, group: dict[str, Any]) -> GroupSettings:
        """The settings of a param group, validated (a setting the group does not carry, its base does not read)."""
        return cls(**{f.name: group[f.name] for f in fields(GroupSettings) if f.name in group})

    def values_for(self, group: dict[str, Any]) -> dict[str, Any]:
        """These settings, as the values of the keys ``group`` carries."""
        return {f.name: getattr(self, f.name) for f in fields(GroupSettings) if f.name in group}


@dataclass
class CBLRConfig(GroupSettings):
    """All the settings of a :class:`~hf_cblr.optim.cblr.CBLR` optimizer (its arguments; documented there).

    ``trust=None`` becomes 1 under the median rule, else :data:`DEFAULT_TRUST` of the ``base``; ``betas`` given as a
    list become a tuple.
    """

    curvature: str = "secant_denoised"
    aggregate: str = "mean"
    rate_rule: str = "inverse_curvature"
    update_interval: int = 1
    base: str = "sgd"
    sample_size: int | None = 4096
    seed: int = 0
    fd_step: float = 1e-3
    foreach: bool | None = None
    fused: bool | None = None
    partition_layout: PartitionLayout | None = None

    def __post_init__(self) -> None:
        if self.base not in DIRECTIONS:
            raise ValueError(f"base={self.base!r} is not valid; valid values: {list(DIRECTIONS)}")
        if self.curvature not in CURVATURE_ESTIMATORS:
            raise ValueError(f"curvature={self.curvature!r} is not a known estimator; valid values: "
                             f"{sorted(CURVATURE_ESTIMATORS)}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate={self.aggregate!r} is not valid; valid values: {list(AGGREGATES)}")
        if self.rate_rule not in RATE_RULES:
            raise ValueError(f"rate_rule={self.rate_rule!r} is not valid; valid values: {sorted(RATE_RULES)}")
        self.update_interval, self.sample_size, self.seed, self.fd_step = (
            _as_python_number(value) for value in (self.update_interval, self.sample_size, self.seed, self.fd_step))
        if isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int) or self.update_interval < 1:
            raise ValueError(f"update_interval must be an integer >= 1, got {self.update_interval!r}")
        sample_size = self.sample_size
        if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1):
            raise ValueError(f"sample_size must be None (all elements) or an integer >= 1, got {sample_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an integer >= 0, got {type(self.seed).__name__} {self.seed!r}")
        if self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.foreach not in (None, True, False):
            raise TypeError(f"foreach must be None, True or False, got {self.foreach!r}")
        if self.fused not in (None, True, False):
            raise TypeError(f"fused must be None, True or False, got {self.fused!r}")
        if self.fused and self.foreach:
            raise ValueError("fused=True and foreach=True cannot be set together (as in torch.optim): choose one kernel path")
        check_number("fd_step", self.fd_step, 0.0, math.inf, include_low=False, include_high=False)
        if self.partition_layout is not None and not isinstance(self.partition_layout, PartitionLayout):
            raise TypeError(f"partition_layout must be None (DeepSpeed ZeRO's) or a PartitionLayout (with "
                            f"holds_partition and fragments), got {self.partition_layout!r}")
        if self.update_interval != 1 and not CURVATURE_ESTIMATORS[self.curvature].needs_closure:
            raise ValueError(
                f"update_interval={self.update_interval} applies to the closure estimators 'hvp', 'fd', 'hutchinson'; "
                f"curvature={self.curvature!r} costs no extra pass and estimates every step: use update_interval=1"
            )
        if self.trust is None:
            self.trust = 1.0 if self.rate_rule == "median" else DEFAULT_TRUST[self.base]
        super().__post_init__()

    def group_defaults(self) -> dict[str, Any]:
        """The per-group hyperparameters that the base reads, as ``torch.optim.Optimizer`` defaults: momentum SGD's
        groups carry no ``betas``/``eps``, Adam's no ``momentum``/``dampening``/``nesterov``, so that torch's momentum
        schedulers (``OneCycleLR``, ``CyclicLR``), which cycle ``betas[0]`` wherever a group has ``betas``, cycle the
        value the step reads."""
        unused = BASE_UNUSED_SETTINGS[self.base]
        return {f.name: getattr(self, f.name) for f in fields(GroupSettings) if f.name not in unused}

    def estimator_settings(self) -> dict[str, Any]:
        """The arguments of the curvature estimator."""
        return {"aggregate": self.aggregate, "sample_size": self.sample_size, "seed": self.seed, "fd_step": self.fd_step}


def _as_python_number(value: Any) -> Any:
    """A numpy (or other ``numbers``) scalar as the Python ``int`` or ``float`` it stands for; anything else as is."""
    if type(value) in (bool, int, float) or not isinstance(value, numbers.Real):
        return value  # np.float64 subclasses float: converted too, so that checkpoints hold Python numbers only
    return int(value) if isinstance(value, numbers.Integral) else float(value)
