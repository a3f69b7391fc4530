r"""CBLR: a curvature-based learning rate for every layer (Gao & Zhong, arXiv 2012.08795).

A *layer* is one parameter tensor. For layer :math:`l` with weights :math:`w`, gradient :math:`g`,
weight decay :math:`\beta`, momentum :math:`\mu`, learning rate :math:`\eta` (the scheduler's value)
and trust coefficient :math:`\tau`:

.. math::

    c_l &\leftarrow \alpha\, c_l + (1 - \alpha)\, \hat c_l
        \quad\text{(EMA of the estimator's } \hat c_l\text{; kept when } \hat c_l \text{ is not finite or } \le 0)\\
    r_l &= \operatorname{clamp}\big(\tau / (c_l + \epsilon_c),\ r_{\min},\ r_{\max}\big)
        \quad (r_l = 1 \text{ outside the adaptation mask and before the first estimate})\\[4pt]
    \textbf{SGD base: } d &= g + \beta w,\quad b \leftarrow \mu b + (1 - \text{dampening})\, r_l d,
        \quad w \leftarrow w - \eta\, b \quad(\text{Nesterov: } w \leftarrow w - \eta (r_l d + \mu b))\\
    \textbf{Adam base: } m &\leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        u = \frac{\hat m}{\sqrt{\hat v} + \epsilon} + \beta w,\quad w \leftarrow w - \eta\, r_l\, u

With ``curvature="weight_norm"`` the SGD base is LARS and the Adam base is LAMB, number for number.

The class gathers the layers (its own, or under ZeRO the fragments of :mod:`hf_cblr.optim.partitioned`) and calls
the functional step, :func:`hf_cblr.optim.functional.cblr_step`, with its parts: the base direction
(:mod:`hf_cblr.optim.directions`), the estimator (:mod:`hf_cblr.optim.estimators`) and the rate rule
(:mod:`hf_cblr.optim.rates`). The full derivation is in ``docs/algorithm.md``, the flow in ``docs/architecture.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from hf_cblr.optim.config import CBLRConfig, GroupSettings
from hf_cblr.optim.directions import create_direction
from hf_cblr.optim.dtensor_layers import DTensorLayers, check_dtensor_support
from hf_cblr.optim.estimators import create_curvature_estimator
from hf_cblr.optim.functional import StepParts, cblr_step
from hf_cblr.optim.layer_sources import LayerSource, LocalLayers
from hf_cblr.optim.param_groups import layer_ndim
from hf_cblr.optim.partitioned import PartitionedLayers, PartitionLayout
from hf_cblr.optim.rates import create_rate_rule
from hf_cblr.optim.types import LayerBatch, StateKind, in_mask

#: The per-parameter state entries of torch's optimizers, to name what saved a state that is not ours.
FOREIGN_STATE_ENTRIES = {
    "torch's Adam/AdamW (optim='adamw_torch')": {"step", "exp_avg", "exp_avg_sq"},
    "torch's SGD with momentum": {"momentum_buffer"},
}
#: ``state_dict()["param_groups"][i][SETTINGS_KEY]``: the settings the saved state belongs to
#: (:meth:`CBLR._estimator_settings`), in every param group, where torch's distributed-checkpoint helpers
#: (``get_optimizer_state_dict``/``set_optimizer_state_dict``) keep them; checkpoints saved before held them at the
#: top level of the state dict, which ``load_state_dict`` still reads.
SETTINGS_KEY = "hf_cblr"


class CBLR(Optimizer):
    r"""Curvature-based layer-wise learning rate on a momentum-SGD or Adam base.

    ``CBLR(params, **kwargs)`` or ``CBLR(params, config=CBLRConfig(...))``: the settings are validated once, by
    :class:`~hf_cblr.optim.config.CBLRConfig` (:meth:`config` gives them without building an optimizer).

    Args:
        params: parameters, named parameters (``model.named_parameters()``), or param groups.
        lr: base learning rate :math:`\eta`; the step of layer ``l`` is :math:`\eta\, r_l` times the
            base direction.
        momentum, dampening, nesterov: momentum SGD, as ``torch.optim.SGD`` (SGD base only).
        weight_decay: :math:`\beta`, inside the direction (coupled for SGD, decoupled AdamW-style for Adam).
        trust: :math:`\tau`, the numerator of the layer rate :math:`r_l = \tau / c_l`; :math:`\eta\tau` is the
            fraction of the layer's Newton step taken. Default (None): 1 under the median rule, else
            :data:`~hf_cblr.optim.config.DEFAULT_TRUST` of the base.
        curvature: estimator name, one of :data:`~hf_cblr.optim.estimators.CURVATURE_ESTIMATORS`:
            ``secant_denoised`` (default), ``secant``, ``secant_pooled``, ``secant_elementwise``, ``weight_norm``,
            ``secant_sampled``, ``hvp``, ``fd``, ``hutchinson`` (the registry's ``cblr_adam`` takes
            ``secant_elementwise`` with ``aggregate="median"``, the best measured on the Adam base). The plain
            stochastic ``secant`` collapses the rates when fine-tuning a transformer (``docs/algorithm.md``, §4 and §8);
            ``secant_denoised`` and ``secant_pooled`` need two or more backward passes per step (gradient
            accumulation) and are not supported under DeepSpeed ZeRO or FSDP2.
        aggregate: ``mean`` or ``median`` of per-element curvatures (element-wise estimators).
        rate_rule: how curvatures become rates, one of :data:`~hf_cblr.optim.rates.RATE_RULES`:
            ``inverse_curvature`` (default, CBLR's :math:`r_l = \tau / c_l`) or ``median`` (MCLR's
            :math:`r_l = \tau\, \operatorname{median}_k c_k / c_l`: the curvature sets how the layers' rates compare,
            the learning rate sets their scale; ``trust`` is then dimensionless; the registry's ``cblr_adam`` takes it).
        curvature_ema: :math:`\alpha`, the EMA factor smoothing the estimates (0: no smoothing).
        curvature_eps: :math:`\epsilon_c`, added to the curvature in the rate's denominator.
        update_interval: estimate every this many steps (``hvp``, ``fd``, ``hutchinson`` only; the
            others cost no extra pass and estimate every step).
        max_ratio: :math:`r_{\max}`, the largest layer rate.
        min_ratio: :math:`r_{\min}`, the smallest layer rate (an extension: see ``docs/algorithm.md``
            on the secant's collapse under gradient noise).
        base: ``sgd`` (the paper's rule) or ``adam`` (the same rate on the Adam direction).
        betas, eps: Adam's moment factors and epsilon (Adam base only).
        weight_decay_mask, adaptation_mask: which layers get weight decay / a curvature rate:
            ``None`` (default) means tensors with ``ndim > 1`` (not biases or norm scales),
            ``True``/``False`` all or none of the group. Set per group to follow parameter names
            (see :func:`hf_cblr.param_groups`).
        sample_size: elements per layer sampled, once, for element-wise estimators (None: all).
        seed: seeds the element samples and Hutchinson probes.
        fd_step: the norm of the finite-difference perturbation of ``curvature="fd"``.
        foreach: multi-tensor kernels (``None``: yes where supported) or the single-tensor loop.
        fused: the fused kernels: each base's elementwise work (Adam's moments and direction, then its update, or both
            in one pass where the estimator reads only its samples; momentum SGD's direction, rate, buffer and update),
            with the per-layer norms, one pass per layer and one call per param group and pass
            (:class:`~hf_cblr.optim._tensor_ops.FusedTensorListOps`): C++ on the CPU (built on a machine's first step,
            about 25 s), Inductor-compiled elsewhere (the first step compiles; lr, rates and step counts are kernel
            inputs, so later steps do not recompile). Where neither can be built, one warning is logged and the foreach
            kernels run. It applies to the optimizer's own layers and to ZeRO partitions (each rank's fragments, their
            partial sums in the step's one all-reduce); FSDP2 shards run the foreach kernels. ``None`` (default): fused
            where measured faster, on contiguous fp32/fp64 CPU layers or ZeRO partitions where the C++ kernels build,
            else foreach (:func:`~hf_cblr.optim._tensor_ops.select_ops`; ``docs/benchmarks.md``, "The fused step").
            ``fused=True`` with ``foreach=True`` is an error, as in torch.
        partition_layout: where a sharding engine puts the layers once it replaces a param group's parameters by
            one flat partition (:class:`~hf_cblr.optim.partitioned.PartitionLayout`). Default (None): DeepSpeed
            ZeRO's, read from the attributes it sets on the parameters.

    ``step(closure)``: for ``hvp``, ``fd`` and ``hutchinson`` the closure re-evaluates the loss of the
    batch whose gradient is in ``.grad`` and returns it *without* calling backward; it is called on
    the steps that estimate curvature, and must be deterministic (no dropout) for ``fd``. For the
    other estimators a closure is called once, as in ``torch.optim.SGD``.
    """

    #: The rate rule of this class's checkpoints saved before ``rate_rule`` was a setting (and so not in their
    #: settings entry): CBLR, LARS and LAMB had CBLR's rule, MCLR the median.
    rate_rule_before_settings: ClassVar[str] = "inverse_curvature"

    def __init__(self, params: Iterable[Any], *, config: CBLRConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = self.config(**kwargs)
        elif kwargs:
            raise TypeError(f"give the settings as config= or as keyword arguments, not both (got config and {sorted(kwargs)})")
        #: The validated settings (:class:`~hf_cblr.optim.config.CBLRConfig`).
        self.settings = config
        self.estimator = create_curvature_estimator(config.curvature, **config.estimator_settings())
        #: The composition of the step: base direction x curvature estimator x rate rule.
        self.parts = StepParts(create_direction(config.base), self.estimator, create_rate_rule(config.rate_rule))
        self.curvature = config.curvature
        self.base = config.base
        self.update_interval = config.update_interval
        self.foreach = config.foreach
        self.fused = config.fused
        # Per layer name: the last step's per-layer vectors of its batch and the layer's index in them
        # (read into floats only by layer_stats()).
        self._last_layer_stats: dict[str, tuple[dict[str, Tensor], int]] = {}
        # The layer sources: under DeepSpeed ZeRO the groups hold flat partitions (this keeps the layers behind them);
        # else the groups' own parameters are the layers.
        self._partitioned = PartitionedLayers(config.partition_layout, self.fused)
        #: FSDP2: the groups hold DTensor shards of the layers
        self.dtensor_layers = DTensorLayers()
        self._local = LocalLayers(self.fused)
        super().__init__(params, config.group_defaults())

    @classmethod
    def cblr_arguments(
        cls,
        *,
        lr: float = 0.1,
        momentum: float = 0.9,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        trust: float | None = None,
        curvature: str = "secant_denoised",
        aggregate: str = "mean",
        rate_rule: str = "inverse_curvature",
        curvature_ema: float = 0.9,
        curvature_eps: float = 1e-8,
        update_interval: int = 1,
        max_ratio: float = 10.0,
        min_ratio: float = 0.0,
        base: str = "sgd",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay_mask: bool | None = None,
        adaptation_mask: bool | None = None,
        sample_size: int | None = 4096,
        seed: int = 0,
        fd_step: float = 1e-3,
        foreach: bool | None = None,
        fused: bool | None = None,
        partition_layout: PartitionLayout | None = None,
    ) -> dict[str, Any]:
        """This class's keyword arguments (the class docstring's Args) as the fields of a :class:`CBLRConfig`."""
        return dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
            trust=trust, curvature=curvature, aggregate=aggregate, rate_rule=rate_rule, curvature_ema=curvature_ema,
            curvature_eps=curvature_eps, update_interval=update_interval, max_ratio=max_ratio, min_ratio=min_ratio,
            base=base, betas=betas, eps=eps, weight_decay_mask=weight_decay_mask, adaptation_mask=adaptation_mask,
            sample_size=sample_size, seed=seed, fd_step=fd_step, foreach=foreach, fused=fused,
            partition_layout=partition_layout)

    @classmethod
    def config(cls, **kwargs: Any) -> CBLRConfig:
        """The validated settings that ``cls(params, **kwargs)`` would have, without building an optimizer."""
        return CBLRConfig(**cls.cblr_arguments(**kwargs))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        complex_params = [param for param in group["params"] if param.is_complex()]
        if complex_params:
            self.param_groups.pop()
            raise TypeError(
                f"{type(self).__name__} does not support complex parameters (got one of dtype {complex_params[0].dtype}): "
                "its fp32 arithmetic would erase their imaginary part; optimize the real view of each, "
                "torch.view_as_real(param), as a real parameter instead"
            )
        group.update(GroupSettings.of_group(group).values_for(group))  # validated; numpy scalars become Python numbers
        check_dtensor_support(group["params"], self.estimator, type(self).__name__)
        self.estimator.watch(group["params"])
        self._partitioned.record(group, len(self.param_groups) - 1,
                                 [in_mask(group["adaptation_mask"], layer_ndim(param)) for param in group["params"]])

    # -- the step --------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        loss = None
        if closure is not None and not self.estimator.needs_closure:
            with torch.enable_grad():
                loss = closure()
        sources: tuple[LayerSource, ...] = (self.dtensor_layers, self._partitioned, self._local)
        for source in sources:  # the first that holds the groups' parameters: DTensor shards, ZeRO partitions, else the layers
            batches = source.batches(
                self.param_groups, self.state, new_state=self.parts.new_state, schema=self.state_schema,
                foreach=self.foreach, rates_need_all_layers=self.rates_need_all_layers,
                optimizer_name=type(self).__name__, estimator=self.estimator)
            if batches is not None:
                break
        if not batches:
            return loss
        step = self._advance_step_counters(batches)
        estimate = not self.estimator.needs_closure or (step - 1) % self.update_interval == 0
        closure_loss, stats = cblr_step(batches, self.parts, step=step, closure=closure, estimate=estimate)
        for chunk_stats in stats:
            for i, name in enumerate(chunk_stats.names):
                self._last_layer_stats[name] = (chunk_stats.vectors, i)
        source.store(self.state, self.state_schema)
        return loss if closure_loss is None else closure_loss

    @property
    def rates_need_all_layers(self) -> bool:
        """The rates depend on all adapted layers together (MCLR's median): under ZeRO one ``step`` must see all of
        them or none."""
        return self.parts.rate_rule.needs_all_layers

    @property
    def state_schema(self) -> dict[str, StateKind]:
        """The kind of every entry of a layer's state: the step's, the base direction's and the estimator's."""
        return self.parts.state_schema

    @staticmethod
    def _advance_step_counters(batches: list[LayerBatch]) -> int:
        """Increment every layer's step (one foreach kernel); the optimizer's step is its first layer's."""
        steps = [state["step"] for batch in batches for state in batch.states]
        torch._foreach_add_(steps, 1.0)
        return int(steps[0].item())

    # -- diagnostics and checkpoints -----------------------------------------------------------
    def layers_of(self, group: dict[str, Any]) -> list[Tensor]:
        """The layers (parameters) of param group ``group``, in order, as they were given: under DeepSpeed ZeRO
        ``group["params"]`` holds one flat partition instead, and ``layer_stats`` still names these layers."""
        return self._partitioned.layers_of(group)

    def layer_names_of(self, group: dict[str, Any]) -> list[str]:
        """The names :meth:`layer_stats` gives the layers of param group ``group``, in the order of :meth:`layers_of`."""
        return self._partitioned.names_of(group)

    def layer_stats(self) -> dict[str, dict[str, float]]:
        """Per layer name, from the last step: ``curvature`` (smoothed; 0 before the first estimate),
        ``rate`` :math:`r_l`, ``update_norm`` :math:`|\\Delta w|` and ``grad_norm`` :math:`|g|`."""
        as_floats: dict[int, dict[str, list[float]]] = {}  # the step's vectors, read once per batch
        result = {}
        for name, (stats, index) in self._last_layer_stats.items():
            if id(stats) not in as_floats:
                as_floats[id(stats)] = {key: vector.tolist() for key, vector in stats.items()}
            result[name] = {key: values[index] for key, values in as_floats[id(stats)].items()}
        return result

    def _estimator_settings(self) -> dict[str, Any]:
        """What the state means besides the param groups: the base direction and the estimator's settings."""
        estimator = self.estimator
        return {"base": self.base, "curvature": self.curvature, "rate_rule": self.settings.rate_rule,
                "aggregate": estimator.aggregate, "sample_size": estimator.sample_size, "seed": estimator.seed}

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state`` and ``param_groups``, every param group with ``"hf_cblr"``: :meth:`_estimator_settings`,
        checked on load. In the param groups, the settings survive torch's ``get_optimizer_state_dict``, which keeps
        only ``state`` and ``param_groups`` (every key of a group but its parameters)."""
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group[SETTINGS_KEY] = self._estimator_settings()
        return state_dict

    @staticmethod
    def _saved_settings(state_dict: dict[str, Any]) -> dict[str, Any] | None:
        """The settings a state dict was saved with: its param groups' (all the same), or its top-level entry
        (checkpoints saved before the settings moved into the param groups); None when it has neither."""
        if SETTINGS_KEY in state_dict:
            return state_dict[SETTINGS_KEY]
        in_groups = [group.get(SETTINGS_KEY) for group in state_dict.get("param_groups", [])]
        if any(settings != in_groups[0] for settings in in_groups):
            raise ValueError(f"the optimizer state's param groups hold different {SETTINGS_KEY!r} settings ({in_groups}): "
                             "one optimizer saves the same settings in every group; this state was edited or merged")
        return in_groups[0] if in_groups else None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved, current = self._saved_settings(state_dict), self._estimator_settings()
        if saved is None and any(state_dict.get("state", {}).values()):
            keys = sorted({key for state in state_dict["state"].values() for key in state})
            source = next((name for name, entries in FOREIGN_STATE_ENTRIES.items() if set(keys) == entries), None)
            saved_by = f", those of {source}" if source else ""
            raise ValueError(
                f"the optimizer state was not saved by an hf_cblr optimizer (its param groups have no {SETTINGS_KEY!r} "
                f"settings entry; its per-parameter entries are {keys}{saved_by}), so this {type(self).__name__} cannot "
                "continue it: start the optimizer fresh (do not load this state, e.g. resume the Trainer without the "
                "checkpoint's optimizer.pt), or load it into the optimizer that saved it"
            )
        if saved is not None and "rate_rule" not in saved:  # saved before the rule was a setting: the class's rule then
            saved = {**saved, "rate_rule": self.rate_rule_before_settings}
        if saved is not None and saved != current:
            differing = {key: saved.get(key) for key in current if saved.get(key) != current[key]}
            raise ValueError(
                f"the optimizer state was saved with {differing}, this {type(self).__name__} has "
                f"{ {key: current[key] for key in differing} }: its curvature state (estimates, element samples, "
                "moments) belongs to those settings; build the optimizer with the saved values to resume"
            )
        previous = list(self.param_groups)
        groups = [{key: value for key, value in group.items() if key != SETTINGS_KEY} for group in state_dict["param_groups"]]
        super().load_state_dict({**{key: value for key, value in state_dict.items() if key != SETTINGS_KEY},
                                 "param_groups": groups})
        self._partitioned.follow(previous, self.param_groups)
        # torch casts every state tensor to its parameter's dtype, integer sample positions included; this
        # optimizer keeps its floating state in fp32 and its positions in int64: restore the saved dtypes.
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        params = chain.from_iterable(group["params"] for group in self.param_groups)
        for param_id, param in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if isinstance(value, Tensor) and value.dtype != param.dtype:
                    self.state[param][key] = value.to(device=param.device, copy=True)
