"""Curvature estimators: how CBLR measures the curvature ``c_l`` of each layer.

An estimator looks at the layers of the optimizer (grouped in :class:`LayerBatch` es, one per
param group, all in fp32) *before* the step is applied, and returns one raw estimate per layer,
NaN where it has none. The optimizer then smooths the estimates with an EMA, keeps the previous
value wherever a new one is not finite or not positive, and turns them into layer rates. All
estimators report the curvature of the *regularized* objective, so they add the layer's weight
decay ``beta`` (the Hessian of ``beta/2 |w|^2`` is ``beta I``).

With the Adam base (``base="adam"``) the curvature is measured in Adam's preconditioned geometry,
``P = 1 / (sqrt(v_hat) + eps)``: the iteration ``w <- w - lr r P g`` is governed by the spectrum
of ``P H``, so every estimator measures ``P H`` instead of ``H``. See ``docs/algorithm.md``.

Add an estimator by subclassing :class:`CurvatureEstimator` and decorating it with
:func:`register_curvature_estimator`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from functools import partial
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from hf_cblr.optim._tensor_ops import TensorList
from hf_cblr.optim.types import Closure, LayerBatch, StateKind

#: Elements whose weight change is below this fraction of the layer's mean |dw| carry no secant
#: information and are ignored by the element-wise estimators.
NEGLIGIBLE_STEP_FRACTION = 1e-3

AGGREGATES = ("mean", "median")


class CurvatureEstimator:
    """Base class. ``estimate`` returns, per batch, a vector of raw curvatures (NaN: no estimate)."""

    name: ClassVar[str]
    #: Needs ``step(closure)``: the closure re-evaluates the loss of the batch whose gradient is in
    #: ``.grad`` and returns it, without calling backward.
    needs_closure: ClassVar[bool] = False
    #: Estimates from per-element curvatures, aggregated by ``aggregate`` over a fixed sample.
    elementwise: ClassVar[bool] = False
    #: The kind of each entry the estimator keeps in a layer's state (ZeRO stores them by it).
    state_schema: ClassVar[dict[str, StateKind]] = {}
    #: Reads ``batch.preconditioner_gains`` (the Adam base then computes them).
    needs_preconditioner_gains: ClassVar[bool] = False
    #: Runs on DeepSpeed ZeRO's flat partitions.
    supports_partitions: ClassVar[bool] = True
    #: Its estimates are already averages over steps: the optimizer takes them as they are (no ``curvature_ema``).
    smoothed: ClassVar[bool] = False

    def __init__(self, *, aggregate: str = "mean", sample_size: int | None = 4096, seed: int = 0,
                 fd_step: float = 1e-3) -> None:
        self.aggregate = aggregate
        self.sample_size = sample_size
        self.seed = seed
        self.fd_step = fd_step

    def watch(self, params: list[Tensor]) -> None:
        """Called with the parameters of every param group as it is added: an estimator may hook them here."""

    def before_direction(self, batch: LayerBatch) -> None:
        """Called with each batch before the base direction is formed. An estimator may measure here what
        it keeps from the last step and lend the buffers that hold it to the step (``batch.workspace``)."""

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        raise NotImplementedError

    def after_update(self, batch: LayerBatch) -> None:
        """Called with each batch once its update is applied: the lent workspace is free again."""

    # -- shared pieces -------------------------------------------------------------------------
    def _aggregate(self, values: Tensor) -> Tensor:
        if values.numel() == 0:
            return torch.tensor(math.nan, device=values.device)
        if self.aggregate == "median":
            return values.median()
        return values.mean()

    def _sample_positions(self, batch: LayerBatch, index: int) -> Tensor | None:
        """The fixed element sample of a layer, drawn once from ``(seed, layer id)`` and kept in its state."""
        state = batch.states[index]
        numel = batch.params[index].numel()
        if self.sample_size is None or numel <= self.sample_size:
            return None
        if "sample_positions" not in state:
            state["sample_positions"] = self._draw_positions(numel, batch.layer_ids[index]).to(batch.params[index].device)
        return state["sample_positions"]

    def _draw_positions(self, numel: int, layer_id: int) -> Tensor:
        """``sample_size`` distinct flat positions of a layer of ``numel > sample_size`` elements, sorted,
        from the generator seeded with ``(seed, layer id)``."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + layer_id)
        return torch.randperm(numel, generator=generator)[: self.sample_size].sort().values


CURVATURE_ESTIMATORS: dict[str, type[CurvatureEstimator]] = {}


def register_curvature_estimator(cls: type[CurvatureEstimator]) -> type[CurvatureEstimator]:
    """Class decorator: make ``cls`` selectable as ``curvature=cls.name``."""
    CURVATURE_ESTIMATORS[cls.name] = cls
    return cls


def create_curvature_estimator(name: str, **kwargs: Any) -> CurvatureEstimator:
    if name not in CURVATURE_ESTIMATORS:
        raise ValueError(f"curvature={name!r} is not a known estimator; valid values: {sorted(CURVATURE_ESTIMATORS)}")
    return CURVATURE_ESTIMATORS[name](**kwargs)


def _nan_where(values: Tensor, invalid: Tensor) -> Tensor:
    return torch.where(invalid, torch.full_like(values, math.nan), values)


@register_curvature_estimator
class WeightNormCurvature(CurvatureEstimator):
    """``c = (|g| + beta |w|) / |w|`` (SGD base, CBLR = LARS) or ``c = |u| / |w|`` (Adam base, CBLR = LAMB).

    The curvature of a quadratic whose minimum is at the origin: the gradient there is ``c w``.
    """

    name = "weight_norm"

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for batch in batches:
            weight_norms = batch.ops.norms(batch.weights)
            adam = batch.second_moments is not None
            numerators = batch.direction_norms if adam else batch.grad_norms + batch.decay * weight_norms
            estimates.append(_nan_where(numerators / weight_norms, weight_norms == 0))
        return estimates


@register_curvature_estimator
class SecantCurvature(CurvatureEstimator):
    """``c = p |g_t - g_{t-1}| / |w_t - w_{t-1}| + beta``: a secant along the last step.

    ``p`` is the gain of the base preconditioner on the layer: 1 for the SGD base, and
    ``|P m_hat| / |m_hat|`` for the Adam base (a scalar fit of ``P``; the element-wise ``|P dg|``
    explodes on elements whose ``v`` is near zero, where Adam's step is bounded). Needs the previous
    gradient (one fp32 copy) and the norm of the last update, which the optimizer records when it
    applies it, so no copy of the weights is kept.

    The previous-gradient buffer does double duty: :meth:`before_direction` forms ``g_{t-1} - g_t`` in it
    and takes the norm, the step then uses it as the workspace of its direction, and :meth:`after_update`
    copies ``g_t`` into it. So the secant costs the step no new tensor (``docs/algorithm.md``, "Numerics").
    """

    name = "secant"
    needs_preconditioner_gains = True
    state_schema: ClassVar[dict[str, StateKind]] = {"prev_grad": StateKind.ELEMENT}

    def before_direction(self, batch: LayerBatch) -> None:
        has_previous = [i for i, state in enumerate(batch.states) if "prev_grad" in state]
        batch.grad_change_norms = batch.no_estimates()
        if has_previous:
            previous = [batch.states[i]["prev_grad"] for i in has_previous]
            batch.ops.sub_(previous, [batch.grads[i] for i in has_previous])  # sign is irrelevant to the norm
            batch.grad_change_norms[has_previous] = batch.ops.norms(previous)
            for i, buffer in zip(has_previous, previous, strict=True):
                batch.workspace[i] = buffer

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        estimates = []
        for batch in batches:
            step_norms = torch.stack([state["update_norm"] for state in batch.states])
            gains = batch.preconditioner_gains if batch.second_moments is not None else 1.0
            secants = gains * batch.grad_change_norms / step_norms + batch.decay  # NaN without a previous gradient
            estimates.append(_nan_where(secants, step_norms == 0))
        return estimates

    def after_update(self, batch: LayerBatch) -> None:
        continuing = [i for i, state in enumerate(batch.states) if "prev_grad" in state]
        batch.ops.copy_([batch.states[i]["prev_grad"] for i in continuing], [batch.grads[i] for i in continuing])
        for i, state in enumerate(batch.states):
            if "prev_grad" not in state:
                state["prev_grad"] = batch.grads[i].detach().clone(memory_format=torch.preserve_format)


class _MicroBatchNorms:
    """One parameter's squared gradient norms over the backward passes of the current step."""

    __slots__ = ("__weakref__", "count", "last", "pending", "total")

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.pending: Tensor | None = None
        self.total: Tensor | float = 0.0  # sum over backward passes of |h_k|^2
        self.last: Tensor | float = 0.0  # |sum_k h_k|^2: .grad after the last pass
        self.count = 0


@register_curvature_estimator
class DenoisedSecantCurvature(SecantCurvature):
    r"""The secant with the gradient noise taken out of :math:`\|g_t - g_{t-1}\|^2`:

    .. math::

        c = p\, \frac{\sqrt{\|g_t - g_{t-1}\|^2 - V_t - V_{t-1}}}{\|w_t - w_{t-1}\|} + \beta,
        \qquad V = \|g\|^2\, \frac{M \rho - 1}{M - 1},\quad
        \rho = \frac{\sum_k \|h_k\|^2}{\|\sum_k h_k\|^2}

    where :math:`h_1 .. h_M` are what the step's :math:`M` backward passes (its accumulated micro-batches)
    added to the layer's ``.grad``. Two mini-batch gradients differ by the curvature along the step *and*
    by sampling noise: :math:`E\|g_t - g_{t-1}\|^2 = \|\bar g_t - \bar g_{t-1}\|^2 + V_t + V_{t-1}` with
    :math:`V = E\|g - \bar g\|^2`. With i.i.d. micro-batches :math:`V` is estimated without bias from their
    spread (``docs/algorithm.md`` §4, ``secant_denoised``). Where what is left does not exceed the noise
    :math:`V_t + V_{t-1}` the layer has no estimate this step (its smoothed curvature is kept). The plain
    secant divides noise by the step length, so its curvature grows as the rates shrink and the rates
    collapse; this one does not.

    The norms come from hooks on the parameters (``register_hook`` for each pass's :math:`h_k`,
    ``register_post_accumulate_grad_hook`` for ``.grad``): a pass counts only when it accumulates into
    ``.grad``, so ``torch.autograd.grad`` calls (closures, probes) do not. :math:`\rho` is a ratio, so loss
    scaling and gradient clipping between backward and step change nothing. A step needs at least two
    backward passes (gradient accumulation); with one the layer has no estimate. Under data parallelism
    the ranks pool their sums (:meth:`before_direction`); not supported on DeepSpeed ZeRO partitions.
    """

    name = "secant_denoised"
    supports_partitions = False
    state_schema: ClassVar[dict[str, StateKind]] = {**SecantCurvature.state_schema, "grad_noise": StateKind.LAYER}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._norms: dict[int, _MicroBatchNorms] = {}
        self._warned = False

    def watch(self, params: list[Tensor]) -> None:
        for param in params:
            if param.requires_grad and id(param) not in self._norms:
                norms = self._norms[id(param)] = _MicroBatchNorms()
                # Weak references: once the optimizer is gone, its hooks do nothing.
                param.register_hook(partial(_record_pass, weakref.ref(norms)))
                param.register_post_accumulate_grad_hook(partial(_commit_pass, weakref.ref(norms)))

    def before_direction(self, batch: LayerBatch) -> None:
        r"""The noise fractions :math:`V / \|g\|^2` of the batch's layers (NaN where unknown), in ``batch``.

        Under data parallelism (``torch.distributed`` initialized, more than one rank) the hooks see a rank's
        own passes; the ranks average their sums :math:`\sum_k \|h_k\|^2` and :math:`\|a\|^2 = \|\sum_k h_k\|^2`
        (one all-reduce), so every rank computes the same rates. With :math:`W` ranks, each rank's gradient has
        the noise :math:`V_r` of one process, the averaged gradient :math:`V_r / W`, and
        :math:`E\|a\|^2 = \|\bar g\|^2 + V_r` while :math:`E\|g\|^2 = \|\bar g\|^2 + V_r / W`:
        the fraction is :math:`(V_r / W) / (\overline{\|a\|^2} - V_r (1 - 1/W))`.
        """
        super().before_direction(batch)
        norms = [self._norms.get(id(param)) for param in batch.params]
        counts = torch.tensor([0 if entry is None else entry.count for entry in norms], dtype=torch.float32)
        sums = torch.zeros(len(norms), 2, dtype=torch.float32, device=batch.decay.device)
        for i, entry in enumerate(norms):
            if entry is not None and entry.count >= 2:
                sums[i, 0], sums[i, 1] = entry.total, entry.last
        world_size = _data_parallel_world_size()
        if world_size > 1:
            torch.distributed.all_reduce(sums)
            sums /= world_size
        totals, lasts = sums.unbind(1)
        counts = counts.to(sums.device)
        local_noise = (counts * totals - lasts) / (counts - 1)  # V_r, in the units of the hooks' gradients
        global_norms = lasts - local_noise * (1 - 1 / world_size)  # |g|^2 in those units
        fractions = (local_noise / world_size / global_norms).clamp(min=0)
        batch.grad_noise_fractions = torch.where((counts >= 2) & (global_norms > 0), fractions, math.nan)
        single_pass = bool((counts == 1).any())
        for entry in norms:
            if entry is not None:
                entry.reset()
        if single_pass and not self._warned:
            self._warned = True
            warnings.warn(
                "curvature='secant_denoised' saw a step with one backward pass: it measures the gradient noise from two or "
                "more (gradient accumulation, micro-batches) and makes no estimate otherwise, so such layers step at rate 1 "
                "(the base optimizer at lr). Accumulate two or more micro-batches per step, or choose another curvature",
                stacklevel=2,
            )

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        return [self._secants(batch, *self._denoised_signal(batch)) for batch in batches]

    def _secants(self, batch: LayerBatch, signal: Tensor, noise: Tensor, step_norms: Tensor) -> Tensor:
        """This step's secants, NaN where the signal does not exceed the noise."""
        gains = batch.preconditioner_gains if batch.second_moments is not None else 1.0
        secants = gains * signal.clamp(min=0).sqrt() / step_norms + batch.decay
        return _nan_where(secants, (step_norms == 0) | ~(signal > noise))

    @staticmethod
    def _denoised_signal(batch: LayerBatch) -> tuple[Tensor, Tensor, Tensor]:
        r"""Per layer: the signal :math:`\|g_t - g_{t-1}\|^2 - V_t - V_{t-1}` (NaN where a noise is unknown), the
        noise :math:`V_t + V_{t-1}` and the last step's length :math:`\|w_t - w_{t-1}\|`; keeps :math:`V_t` for the
        next step."""
        noise = batch.grad_noise_fractions * batch.grad_norms.square()
        previous = torch.stack([state.get("grad_noise", torch.tensor(math.nan, device=noise.device))
                                for state in batch.states])
        signal = batch.grad_change_norms.square() - noise - previous
        step_norms = torch.stack([state["update_norm"] for state in batch.states])
        for state, value, known in zip(batch.states, noise, noise.isfinite().tolist(), strict=True):
            if known:
                state["grad_noise"] = value.clone()
            else:
                state.pop("grad_noise", None)
        return signal, noise + previous, step_norms


@register_curvature_estimator
class PooledSecantCurvature(DenoisedSecantCurvature):
    r"""The denoised secant pooled over steps: a ratio of EMAs instead of an EMA of ratios.

    .. math::

        S_l \leftarrow \alpha S_l + (1 - \alpha)\,(\|g_t - g_{t-1}\|^2 - V_t - V_{t-1}),\qquad
        D_l \leftarrow \alpha D_l + (1 - \alpha)\,\|w_t - w_{t-1}\|^2,\qquad
        c = p \sqrt{S_l / D_l} + \beta

    with :math:`\alpha` the group's ``curvature_ema``. Under :math:`g_t - g_{t-1} = H \Delta w + \text{noise}`
    each step's denoised :math:`\|\Delta g\|^2` is an unbiased, often negative, estimate of
    :math:`\|H \Delta w\|^2`; the pooled ratio is the least-squares fit of :math:`c^2` over the recent steps, which
    weighs each step by its length. :class:`DenoisedSecantCurvature` keeps only the steps whose signal exceeds the
    noise; when the decaying learning rate shortens the steps, the steps that pass are those whose noise came out
    high, so its curvature drifts up and its rates down. Pooling keeps every step, negative signals included, and
    so has no such selection (``docs/algorithm.md`` §4). A layer has an estimate once :math:`S_l > 0`. The
    estimate is already an average, so the optimizer takes it as it is (no second EMA).
    """

    name = "secant_pooled"
    smoothed = True
    state_schema: ClassVar[dict[str, StateKind]] = {
        **DenoisedSecantCurvature.state_schema, "pooled_signal": StateKind.LAYER, "pooled_step_square": StateKind.LAYER}

    def _secants(self, batch: LayerBatch, signal: Tensor, noise: Tensor, step_norms: Tensor) -> Tensor:
        ema = batch.group["curvature_ema"]
        zero = torch.zeros((), device=signal.device)
        pooled = torch.stack([torch.stack([state.get("pooled_signal", zero), state.get("pooled_step_square", zero)])
                              for state in batch.states])
        fresh = torch.stack([signal.nan_to_num(), step_norms.square()], dim=1)
        valid = (signal.isfinite() & (step_norms > 0)).unsqueeze(1)
        pooled = torch.where(valid, ema * pooled + (1 - ema) * fresh, pooled)
        for state, (pooled_signal, pooled_step_square) in zip(batch.states, pooled, strict=True):
            state["pooled_signal"], state["pooled_step_square"] = pooled_signal.clone(), pooled_step_square.clone()
        ratios = pooled[:, 0] / pooled[:, 1]  # NaN before the first step with a signal
        gains = batch.preconditioner_gains if batch.second_moments is not None else 1.0
        return _nan_where(gains * ratios.clamp(min=0).sqrt() + batch.decay, ~(ratios > 0))


def _data_parallel_world_size() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_world_size() if distributed else 1


def _record_pass(reference: weakref.ref[_MicroBatchNorms], grad: Tensor) -> None:
    norms = reference()
    if norms is not None:
        norms.pending = torch.linalg.vector_norm(grad.detach(), dtype=torch.float32).square()


def _commit_pass(reference: weakref.ref[_MicroBatchNorms], param: Tensor) -> None:
    norms = reference()
    if norms is not None and norms.pending is not None and param.grad is not None:
        norms.total = norms.total + norms.pending
        norms.last = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32).square()
        norms.count += 1
        norms.pending = None


class FragmentSample(NamedTuple):
    """The part of a layer's element sample that lies in one fragment of the layer (under ZeRO)."""

    #: places in the layer's sample (``0 <= slot < size``) of the positions in the fragment
    slots: Tensor
    #: those positions, relative to the fragment's first element
    local: Tensor
    #: elements in the layer's whole sample: ``min(numel, sample_size)``
    size: int


@register_curvature_estimator
class ElementwiseSecantCurvature(CurvatureEstimator):
    """Per-element secants ``|P_i dg_i| / |dw_i|``, aggregated over the layer's element sample.

    Keeps the previous gradient and weight at the sampled positions only (``sample_size`` values
    each); elements whose ``|dw_i|`` is negligible are ignored. Layers of similar sample length are
    computed together: their samples are padded with NaN into one ``[layers, length]`` matrix (lengths
    within a factor 2, so padding at most doubles it), and NaN (padding, or an element that did not
    move) is left out of the row's mean or median. On ZeRO fragments the sample is the
    one of the whole layer, and the estimates are those of one process (:meth:`_estimate_on_fragments`).
    """

    name = "secant_elementwise"
    elementwise = True
    state_schema: ClassVar[dict[str, StateKind]] = {
        "sample_prev_grad": StateKind.ROW, "sample_prev_weight": StateKind.ROW, "sample_positions": StateKind.ROW}

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fragment_samples: dict[tuple[int, int, int], FragmentSample] = {}

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        return [self._estimate(batch) if batch.fragments is None else self._estimate_on_fragments(batch)
                for batch in batches]

    def _estimate(self, batch: LayerBatch) -> Tensor:
        """One process, whole layers: the layers of similar sample length as one padded matrix."""
        positions = [self._sample_positions(batch, i) for i in range(len(batch))]
        grads = _samples(batch.grads, positions)
        weights = _samples(batch.weights, positions)
        estimate = batch.no_estimates()
        known = [i for i, state in enumerate(batch.states) if "sample_prev_grad" in state]
        for rows in _similar_lengths(known, [grads[i].numel() for i in known]):
            curvatures = self._curvatures(batch, rows, [positions[i] for i in rows], [grads[i] for i in rows],
                                          [weights[i] for i in rows])
            aggregated = curvatures.nanmedian(dim=1).values if self.aggregate == "median" else curvatures.nanmean(dim=1)
            estimate[rows] = aggregated + batch.decay[rows]
        for state, grad, weight in zip(batch.states, grads, weights, strict=True):
            state["sample_prev_grad"] = grad
            state["sample_prev_weight"] = weight
        return estimate

    def _secant(self, grad_change: Tensor, weight_change: Tensor) -> Tensor:
        """``agg_i(P_i |dg_i| / |dw_i|)`` over the sampled elements with ``|dw_i| > 10^-3 mean_j |dw_j|``."""
        moved = weight_change > NEGLIGIBLE_STEP_FRACTION * weight_change.mean()
        return self._aggregate(grad_change[moved] / weight_change[moved])

    def _estimate_on_fragments(self, batch: LayerBatch) -> Tensor:
        r"""The estimates of the whole layers from this rank's fragments: those of one process, to float rounding.

        The rank keeps the previous gradient and weight at the sampled positions of its fragments only.
        It writes :math:`P_i |\Delta g_i|` and :math:`|\Delta w_i|` of those positions, at their slots in
        their layer's sample, into one zero vector ``[P|dg| of sample 1, |dw| of sample 1, P|dg| of
        sample 2, ...]`` of all the batch's layers, and one all-reduce sums it over the ranks. Every
        sampled position lies in exactly one rank's fragment, so each entry is ``x + 0 + ... + 0 = x``:
        every rank then holds the samples one process measures, in the same order, and aggregates them
        as one process does (per layer here; :meth:`_estimate` batches the layers and divides instead of
        multiplying by the preconditioner's reciprocal, so the two differ by rounding, about 1e-7 relative).
        """
        estimate = batch.no_estimates()
        samples = [self._fragment_sample(batch, i) for i in range(len(batch))]
        continuing = [i for i, state in enumerate(batch.states) if "sample_prev_grad" in state]
        if continuing:  # the same layers on every rank: they all started at the partition's first step
            offsets = [0]
            for i in continuing:
                offsets.append(offsets[-1] + 2 * samples[i].size)
            measured = torch.zeros(offsets[-1], dtype=torch.float32, device=batch.decay.device)
            for i, offset in zip(continuing, offsets[:-1], strict=True):
                slots, local, size = samples[i]
                state = batch.states[i]
                grad_change = (batch.grads[i][local] - state["sample_prev_grad"]).abs_() * batch.preconditioner_at(i, local)
                measured[offset + slots] = grad_change
                measured[offset + size + slots] = (batch.weights[i][local] - state["sample_prev_weight"]).abs_()
            batch.ops.all_reduce_sum(measured)
            for i, offset in zip(continuing, offsets[:-1], strict=True):
                size = samples[i].size
                grad_change, weight_change = measured[offset: offset + 2 * size].split(size)
                estimate[i] = self._secant(grad_change, weight_change) + batch.decay[i]
        for i, state in enumerate(batch.states):
            state["sample_prev_grad"] = batch.grads[i][samples[i].local]
            state["sample_prev_weight"] = batch.weights[i][samples[i].local]
        return estimate

    def _fragment_sample(self, batch: LayerBatch, index: int) -> FragmentSample:
        """The part of layer ``index``'s sample in its fragment: the whole layer's sample of one process
        (:meth:`_draw_positions`, or all elements when ``numel <= sample_size``). Drawn once per process and
        kept here, not in the optimizer state: it is a function of the seed, the layer and the fragment."""
        assert batch.fragments is not None
        fragment = batch.fragments[index]
        key = (batch.layer_ids[index], fragment.layer_start, fragment.length)
        if key not in self._fragment_samples:
            numel = fragment.layer_numel
            if self.sample_size is None or numel <= self.sample_size:
                positions = torch.arange(numel)
            else:
                positions = self._draw_positions(numel, batch.layer_ids[index])
            slots = ((positions >= fragment.layer_start) & (positions < fragment.layer_start + fragment.length)).nonzero()[:, 0]
            device = batch.params[index].device
            self._fragment_samples[key] = FragmentSample(
                slots.to(device), (positions[slots] - fragment.layer_start).to(device), positions.numel())
        return self._fragment_samples[key]

    @staticmethod
    def _curvatures(batch: LayerBatch, rows: list[int], positions: list[Tensor | None], grads: TensorList,
                    weights: TensorList) -> Tensor:
        """``[len(rows), length]`` per-element secants ``P_i |dg_i| / |dw_i|`` of the layers ``rows``, NaN where none."""
        grad_change = (_padded(grads) - _padded([batch.states[i]["sample_prev_grad"] for i in rows])).abs_()
        if batch.second_moments is not None:
            denominators = _padded(_samples([batch.second_moments[i] for i in rows], positions)).sqrt_()
            scales = torch.tensor([batch.inverse_sqrt_bias_corrections2[i] for i in rows], device=denominators.device)
            grad_change /= denominators.mul_(scales[:, None]).add_(batch.group["eps"])
        steps = (_padded(weights) - _padded([batch.states[i]["sample_prev_weight"] for i in rows])).abs_()
        moved = steps > NEGLIGIBLE_STEP_FRACTION * steps.nanmean(dim=1, keepdim=True)
        return torch.where(moved, grad_change / steps, math.nan)


def _similar_lengths(indices: list[int], lengths: list[int]) -> list[list[int]]:
    """``indices`` grouped by length, within a factor 2: by ``ceil(log2(length))``."""
    groups: dict[int, list[int]] = {}
    for index, length in zip(indices, lengths, strict=True):
        groups.setdefault((length - 1).bit_length(), []).append(index)
    return list(groups.values())


def _samples(tensors: TensorList, positions: list[Tensor | None]) -> TensorList:
    """Each tensor's values at its flat ``positions``, as new 1-D tensors (a copy of all values where None)."""
    return [t.reshape(-1).clone() if p is None else t.reshape(-1)[p] for t, p in zip(tensors, positions, strict=True)]


def _padded(samples: TensorList) -> Tensor:
    """The 1-D ``samples`` as the rows of one matrix, padded with NaN to the longest (at least one column:
    the row of a layer without elements is NaN, no estimate)."""
    padded = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=math.nan)
    return padded if padded.shape[1] else padded.new_full((len(samples), 1), math.nan)


def _all_layers(batches: list[LayerBatch]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    params, where = [], []
    for b, batch in enumerate(batches):
        for i, param in enumerate(batch.params):
            params.append(param)
            where.append((b, i))
    return params, where


def _require_closure(name: str, closure: Closure | None) -> Closure:
    if closure is None:
        raise TypeError(
            f"curvature={name!r} needs a closure: call optimizer.step(closure) with a closure that "
            "re-evaluates the loss on the batch whose gradient is in .grad and returns it without "
            "calling backward; or choose a curvature that needs none: 'secant', 'secant_elementwise', "
            "'weight_norm'"
        )
    return closure


def _directions(batches: list[LayerBatch]) -> list[TensorList]:
    """The direction ``v`` the directional estimators probe: ``g`` (SGD base) or ``P g`` (Adam base)."""
    directions = []
    for batch in batches:
        vectors = [grad.clone() for grad in batch.grads]
        batch.precondition_(vectors)
        directions.append(vectors)
    return directions


def hessian_vector_products(params: list[Tensor], vectors: TensorList, closure: Closure) -> TensorList:
    """``H v`` by double backward through ``closure()``; zeros for parameters the loss does not use."""
    with torch.enable_grad():
        loss = closure()
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [i for i, grad in enumerate(grads) if grad is not None and grad.requires_grad]
        try:
            products = torch.autograd.grad(
                [grads[i] for i in used], [params[i] for i in used],
                grad_outputs=[vectors[i].to(params[i].dtype) for i in used], allow_unused=True,
            )
        except RuntimeError as error:
            raise RuntimeError(
                "curvature='hvp' needs a double backward through the model, which fused attention kernels "
                "(SDPA, flash-attention, cuDNN) do not have. Load the model with attn_implementation='eager', "
                f"or use curvature='fd', which needs no double backward. Original error: {error}"
            ) from error
    result = [torch.zeros_like(vector) for vector in vectors]
    for i, product in zip(used, products, strict=True):
        if product is not None:
            result[i] = product.float()
    return result


def finite_difference_hessian_vector_products(
    params: list[Tensor], grads: TensorList, vectors: TensorList, closure: Closure, fd_step: float
) -> TensorList:
    """``H v ~ (grad L(w + eps v) - grad L(w)) / eps`` with ``eps |v| = fd_step``, one extra backward."""
    vector_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in vectors])).item()
    if vector_norm == 0 or not math.isfinite(vector_norm):
        return [torch.zeros_like(v) for v in vectors]
    epsilon = fd_step / vector_norm
    saved = [param.detach().clone() for param in params]
    try:
        for param, vector in zip(params, vectors, strict=True):
            param.add_(vector.to(param.dtype), alpha=epsilon)
        with torch.enable_grad():
            loss = closure()
            perturbed = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        for param, original in zip(params, saved, strict=True):
            param.copy_(original)
    return [
        torch.zeros_like(grad) if new is None else (new.float() - grad) / epsilon
        for grad, new in zip(grads, perturbed, strict=True)
    ]


class _DirectionalCurvature(CurvatureEstimator):
    """``c = <v, H v> / <g, v> + beta`` per layer, with ``v = g`` (SGD) or ``v = P g`` (Adam).

    For the SGD base this is ``<g, H g> / |g|^2``, the curvature along the gradient: a step of
    ``1 / c`` along ``-g`` minimizes the layer's quadratic model exactly.
    """

    needs_closure = True

    def _products(self, batches: list[LayerBatch], params: list[Tensor], vectors: TensorList,
                  closure: Closure) -> TensorList:
        raise NotImplementedError

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        closure = _require_closure(self.name, closure)
        directions = _directions(batches)
        params, _ = _all_layers(batches)
        vectors = [vector for vectors_of_batch in directions for vector in vectors_of_batch]
        products = iter(self._products(batches, params, vectors, closure))
        estimates = []
        for batch, vectors_of_batch in zip(batches, directions, strict=True):
            products_of_batch = [next(products) for _ in vectors_of_batch]
            curvature = batch.ops.dot(vectors_of_batch, products_of_batch) / batch.ops.dot(batch.grads, vectors_of_batch)
            estimates.append(curvature + batch.decay)
        return estimates


@register_curvature_estimator
class HessianVectorCurvature(_DirectionalCurvature):
    """Directional curvature by an exact Hessian-vector product (double backward)."""

    name = "hvp"

    def _products(self, batches: list[LayerBatch], params: list[Tensor], vectors: TensorList,
                  closure: Closure) -> TensorList:
        return hessian_vector_products(params, vectors, closure)


@register_curvature_estimator
class FiniteDifferenceCurvature(_DirectionalCurvature):
    """Directional curvature by a finite difference of gradients on the same batch."""

    name = "fd"

    def _products(self, batches: list[LayerBatch], params: list[Tensor], vectors: TensorList,
                  closure: Closure) -> TensorList:
        grads = [grad for batch in batches for grad in batch.grads]
        return finite_difference_hessian_vector_products(params, grads, vectors, closure, self.fd_step)


@register_curvature_estimator
class HutchinsonCurvature(CurvatureEstimator):
    """Per-element ``P_i |z_i (H z)_i|`` with Rademacher ``z`` (Hutchinson's diagonal), aggregated per layer."""

    name = "hutchinson"
    needs_closure = True
    elementwise = True
    state_schema: ClassVar[dict[str, StateKind]] = {"sample_positions": StateKind.ROW}

    def estimate(self, batches: list[LayerBatch], closure: Closure | None, step: int) -> list[Tensor]:
        closure = _require_closure(self.name, closure)
        params, where = _all_layers(batches)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        probes = [
            torch.randint(0, 2, param.shape, generator=generator, dtype=torch.float32).mul_(2).sub_(1).to(param.device)
            for param in params
        ]
        products = hessian_vector_products(params, probes, closure)
        estimates = [batch.no_estimates() for batch in batches]
        for (b, i), probe, product in zip(where, probes, products, strict=True):
            batch = batches[b]
            positions = self._sample_positions(batch, i)
            diagonal = (probe * product).abs_().reshape(-1)
            diagonal = diagonal if positions is None else diagonal[positions]
            curvature = self._aggregate(diagonal * batch.preconditioner_at(i, positions))
            estimates[b][i] = curvature + batch.decay[i]
        return estimates
