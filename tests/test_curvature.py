r"""The curvature estimators on quadratics whose curvature is known, layer by layer.

:math:`L = \sum_l \tfrac12 (w_l - w^*_l)^\top A_l (w_l - w^*_l)` has the block-diagonal Hessian
:math:`\operatorname{diag}(A_l)`. Along the gradient :math:`g_l = A_l (w_l - w^*_l)` the curvature of
layer ``l`` is :math:`g_l^\top A_l g_l / |g_l|^2`; where :math:`A_l = h_l I` every estimator should find
:math:`h_l` (plus the weight decay :math:`\beta`, the curvature of :math:`\tfrac\beta2 |w|^2`).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from hf_cblr import CBLR, MCLR


class Quadratic:
    r""":math:`\sum_l \tfrac12 x_l^\top A_l x_l`, :math:`x_l = w_l - w^*_l`.

    ``hessians[l]`` is either a tensor of layer ``l``'s shape, the diagonal of :math:`A_l`, or a
    ``(numel, numel)`` symmetric positive definite matrix.
    """

    def __init__(self, shapes: list[tuple[int, ...]], hessians: list[Tensor], seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.params = [nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
        self.minimum = [torch.randn(shape, generator=generator) for shape in shapes]
        self.hessians = hessians

    def _hessian_times(self, layer: int, x: Tensor) -> Tensor:
        hessian = self.hessians[layer]
        return hessian * x if hessian.shape == x.shape else (hessian @ x.reshape(-1)).view_as(x)

    def loss(self) -> Tensor:
        """The loss, differentiable twice (the closure of the ``hvp``, ``fd`` and ``hutchinson`` estimators)."""
        return sum(0.5 * torch.sum(x * self._hessian_times(layer, x)) for layer, x in enumerate(self.offsets()))

    def offsets(self) -> list[Tensor]:
        return [p - m for p, m in zip(self.params, self.minimum, strict=True)]

    def gradients(self) -> list[Tensor]:
        with torch.no_grad():
            return [self._hessian_times(layer, x) for layer, x in enumerate(self.offsets())]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        for param, grad in zip(self.params, self.gradients(), strict=True):
            param.grad = grad
        needs_closure = isinstance(optimizer, CBLR) and optimizer.estimator.needs_closure
        optimizer.step(self.loss if needs_closure else None)


def _isotropic(shapes: list[tuple[int, ...]], curvatures: list[float]) -> list[Tensor]:
    return [torch.full(shape, h) for shape, h in zip(shapes, curvatures, strict=True)]


def _spd_matrix(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """A dense symmetric positive definite matrix with eigenvalues spread over ``[low, high]``."""
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=generator))
    eigenvalues = torch.linspace(low, high, n)
    return basis @ torch.diag(eigenvalues) @ basis.T


def _curvatures(optimizer: CBLR) -> list[float]:
    return [stats["curvature"] for stats in optimizer.layer_stats().values()]


SHAPES = [(6, 5), (4, 8), (3, 7)]
SCALES = [0.2, 3.0, 40.0]


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("curvature", ["hvp", "fd"])
def test_directional_estimators_recover_each_layer_curvature(curvature: str, base: str) -> None:
    """``hvp`` and ``fd`` measure ``<v, A v> / <g, v> + beta`` with ``v = g`` (SGD) or ``v = P g`` (Adam) to 1%."""
    generator = torch.Generator().manual_seed(1)
    hessians = [_spd_matrix(math.prod(shape), 0.5 * h, 2 * h, generator) for shape, h in zip(SHAPES, SCALES, strict=True)]
    problem = Quadratic(SHAPES, hessians)
    weight_decay, adam_eps = 0.05, 1e-8
    grads = problem.gradients()
    # v = g, or v = P g where after Adam's first step v_hat = g^2, so P = 1 / (|g| + eps)
    directions = grads if base == "sgd" else [g / (g.abs() + adam_eps) for g in grads]
    expected = [
        (torch.sum(v * (hessian @ v.reshape(-1)).view_as(v)) / torch.sum(g * v)).item() + weight_decay
        for g, v, hessian in zip(grads, directions, hessians, strict=True)
    ]
    # A quadratic has no finite-difference truncation error, so fd can take a large step; it lifts the perturbation
    # of the layer whose gradient is 200x smaller than the largest well above the fp32 rounding of its weights.
    # lr = 0: the estimate is made, and fd must leave the weights exactly as they were.
    optimizer = CBLR(problem.params, lr=0.0, weight_decay=weight_decay, curvature=curvature, base=base, eps=adam_eps,
                     fd_step=0.1)
    initial = [p.detach().clone() for p in problem.params]
    problem.step(optimizer)
    assert all(torch.equal(p, p0) for p, p0 in zip(problem.params, initial, strict=True))
    if base == "sgd":  # each layer has its own curvature (Adam's preconditioner evens them out)
        assert expected[2] > 5 * expected[1] > 25 * expected[0]
    torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), torch.tensor(expected), rtol=1e-2, atol=0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_secant_recovers_each_layer_curvature_after_one_step(weight_decay: float) -> None:
    curvatures = SCALES
    problem = Quadratic(SHAPES, _isotropic(SHAPES, curvatures))
    optimizer = CBLR(problem.params, lr=1e-2, weight_decay=weight_decay, trust=1.0, max_ratio=2.0, min_ratio=0.05,
                     curvature="secant")
    problem.step(optimizer)
    # No previous step: no curvature yet, and the rate is 1.
    assert _curvatures(optimizer) == [0.0, 0.0, 0.0]
    assert [stats["rate"] for stats in optimizer.layer_stats().values()] == [1.0, 1.0, 1.0]
    expected = torch.tensor(curvatures) + weight_decay
    for _ in range(3):
        problem.step(optimizer)
        torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), expected, rtol=1e-3, atol=0)
    rates = torch.tensor([stats["rate"] for stats in optimizer.layer_stats().values()])
    assert rates[0] == 2.0 and rates[2] == 0.05  # clamped to [min_ratio, max_ratio]
    torch.testing.assert_close(rates, (1 / expected).clamp(min=0.05, max=2.0), rtol=1e-3, atol=0)


def test_secant_on_adam_base_scales_by_the_preconditioner_gain() -> None:
    r"""Adam base: ``c = p |dg| / |dw|`` with the gain ``p = |P m_hat| / |m_hat|`` (``= p h`` on ``h I``)."""
    curvatures = SCALES
    problem = Quadratic(SHAPES, _isotropic(SHAPES, curvatures))
    betas, eps = (0.9, 0.999), 1e-8
    optimizer = CBLR(problem.params, lr=1e-2, base="adam", betas=betas, eps=eps, curvature="secant", curvature_ema=0.0)
    problem.step(optimizer)
    problem.step(optimizer)
    expected = []
    for param, h in zip(problem.params, curvatures, strict=True):
        state = optimizer.state[param]
        preconditioner = 1 / ((state["exp_avg_sq"] / (1 - betas[1] ** 2)).sqrt() + eps)
        gain = torch.linalg.vector_norm(preconditioner * state["exp_avg"]) / torch.linalg.vector_norm(state["exp_avg"])
        expected.append(gain.item() * h)
    torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), torch.tensor(expected), rtol=1e-3, atol=0)


@pytest.mark.parametrize("aggregate", ["mean", "median"])
@pytest.mark.parametrize("curvature", ["hutchinson", "secant_elementwise"])
def test_elementwise_estimators_recover_each_layer_curvature(curvature: str, aggregate: str) -> None:
    curvatures = SCALES
    problem = Quadratic(SHAPES, _isotropic(SHAPES, curvatures))
    optimizer = CBLR(problem.params, lr=1e-2, curvature=curvature, aggregate=aggregate)
    for _ in range(3):
        problem.step(optimizer)
    torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), torch.tensor(curvatures), rtol=1e-2, atol=0)


@pytest.mark.parametrize("aggregate", ["mean", "median"])
@pytest.mark.parametrize("sample_size", [64, None])
def test_elementwise_secant_on_adam_base_is_the_per_layer_formula(aggregate: str, sample_size: int | None) -> None:
    r"""Adam base: ``c_l = agg_i P_i |dg_i| / |dw_i| + beta`` over the sampled elements that moved, layer by layer,
    although layers of different sample lengths are computed together (padded)."""
    shapes = [(20, 10), (7,), (3, 5), (40,)]
    generator = torch.Generator().manual_seed(5)
    problem = Quadratic(shapes, [torch.exp(torch.randn(shape, generator=generator)) for shape in shapes])
    betas, eps, decay = (0.9, 0.99), 1e-8, 0.1
    optimizer = CBLR(problem.params, lr=1e-2, base="adam", betas=betas, eps=eps, weight_decay=decay, weight_decay_mask=True,
                     curvature="secant_elementwise", aggregate=aggregate, curvature_ema=0.0, sample_size=sample_size)
    weights, grads = [p.detach().clone() for p in problem.params], problem.gradients()
    problem.step(optimizer)
    weight_changes = [p.detach() - w for p, w in zip(problem.params, weights, strict=True)]
    grad_changes = [g - g0 for g, g0 in zip(problem.gradients(), grads, strict=True)]
    problem.step(optimizer)
    expected = []
    for param, dw, dg in zip(problem.params, weight_changes, grad_changes, strict=True):
        state = optimizer.state[param]
        preconditioner = 1 / ((state["exp_avg_sq"] / (1 - betas[1] ** 2)).sqrt() + eps)
        positions = state.get("sample_positions", torch.arange(param.numel()))
        dw, dg, p = (t.reshape(-1)[positions] for t in (dw, dg, preconditioner))
        moved = dw.abs() > 1e-3 * dw.abs().mean()
        secants = p[moved] * dg[moved].abs() / dw[moved].abs()
        expected.append((secants.median() if aggregate == "median" else secants.mean()).item() + decay)
    assert ("sample_positions" in optimizer.state[problem.params[0]]) == (sample_size is not None)
    torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), torch.tensor(expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("aggregate", ["mean", "median"])
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_elementwise_secant_gives_no_estimate_for_a_layer_without_elements(aggregate: str, base: str) -> None:
    problem = Quadratic([(0, 3), (4, 3)], [torch.ones(0, 3), torch.full((4, 3), 2.0)])
    optimizer = CBLR(problem.params, lr=1e-2, base=base, curvature="secant_elementwise", aggregate=aggregate)
    for _ in range(3):
        problem.step(optimizer)
    curvatures = _curvatures(optimizer)
    assert curvatures[0] == 0.0 and curvatures[1] > 0


def _steps_to_minimum(problem: Quadratic, optimizer: torch.optim.Optimizer, max_steps: int, tolerance: float = 1e-8) -> int:
    """Steps until the loss is ``tolerance`` times its initial value (``max_steps + 1``: not within ``max_steps``)."""
    initial = problem.loss().item()
    for step in range(1, max_steps + 1):
        problem.step(optimizer)
        loss = problem.loss().item()
        if not math.isfinite(loss):
            break
        if loss <= tolerance * initial:
            return step
    return max_steps + 1


ILL_CONDITIONED = [0.1, 1.0, 10.0, 100.0]
ILL_SHAPES = [(8, 4)] * len(ILL_CONDITIONED)
SGD_MAX_STEPS = 300


@pytest.fixture(scope="module")
def best_sgd_steps() -> int:
    """The fewest steps momentum SGD needs with the best single learning rate (and momentum) of a small grid."""
    steps = []
    for lr in (2e-3, 5e-3, 1e-2, 1.9e-2, 3e-2):
        for momentum in (0.0, 0.9):
            problem = Quadratic(ILL_SHAPES, _isotropic(ILL_SHAPES, ILL_CONDITIONED))
            optimizer = torch.optim.SGD(problem.params, lr=lr, momentum=momentum)
            steps.append(_steps_to_minimum(problem, optimizer, SGD_MAX_STEPS))
    return min(steps)


@pytest.mark.parametrize("curvature", ["secant", "hvp", "fd", "secant_elementwise", "hutchinson"])
def test_cblr_reaches_the_minimum_in_far_fewer_steps_than_sgd(curvature: str, best_sgd_steps: int) -> None:
    """Curvatures 0.1 ... 100: one learning rate must be < 2 / 100 and then crawls on the flat layer;
    CBLR's layer rates ``trust / c_l`` make every layer's step a Newton step (``lr * trust = 1``)."""
    problem = Quadratic(ILL_SHAPES, _isotropic(ILL_SHAPES, ILL_CONDITIONED))
    optimizer = CBLR(problem.params, lr=1e-2, trust=100.0, momentum=0.0, curvature=curvature, max_ratio=math.inf)
    cblr_steps = _steps_to_minimum(problem, optimizer, SGD_MAX_STEPS)
    assert cblr_steps * 20 <= best_sgd_steps, (cblr_steps, best_sgd_steps)


def _mclr_problem(seed: int = 0) -> Quadratic:
    """Three layers: a large one (200k elements) with log-normal per-element curvatures, two small isotropic ones."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(400, 500), (10, 10), (10, 10)]
    large = torch.exp(0.5 * torch.randn(shapes[0], generator=generator))
    return Quadratic(shapes, [large, torch.full(shapes[1], 0.3), torch.full(shapes[2], 5.0)], seed=seed)


def test_mclr_sampled_median_is_close_to_the_exact_median() -> None:
    curvatures = {}
    for sample_size in (4096, None):
        problem = _mclr_problem()
        optimizer = MCLR(problem.params, lr=0.05, trust=1.0, momentum=0.0, curvature_ema=0.0, sample_size=sample_size)
        problem.step(optimizer)
        problem.step(optimizer)
        curvatures[sample_size] = _curvatures(optimizer)
        # r_l = trust * median_k(c_k) / c_l: the large layer holds the median curvature over layers.
        rates = [stats["rate"] for stats in optimizer.layer_stats().values()]
        c = curvatures[sample_size]
        torch.testing.assert_close(torch.tensor(rates), torch.tensor([1.0, c[0] / c[1], c[0] / c[2]]), rtol=1e-5, atol=0)
        assert ("sample_positions" in optimizer.state[problem.params[0]]) == (sample_size is not None)
    exact_median = torch.median(_mclr_problem().hessians[0]).item()
    assert curvatures[None][0] == pytest.approx(exact_median, rel=5e-3)
    assert curvatures[4096][0] == pytest.approx(curvatures[None][0], rel=5e-2)
    assert curvatures[4096][0] != curvatures[None][0]  # it did sample
    assert curvatures[4096][1:] == pytest.approx([0.3, 5.0], rel=1e-3)


def _anisotropic_problem() -> Quadratic:
    generator = torch.Generator().manual_seed(2)
    shapes = [(50, 40), (20, 10)]
    return Quadratic(shapes, [torch.exp(torch.randn(shape, generator=generator)) for shape in shapes])


def _run(curvature: str, seed: int, global_seed: int) -> tuple[Quadratic, CBLR]:
    torch.manual_seed(global_seed)  # the estimators use their own generators, not the global one
    problem = _anisotropic_problem()
    optimizer_class = MCLR if curvature == "secant_elementwise" else CBLR
    optimizer = optimizer_class(problem.params, lr=0.05, curvature=curvature, aggregate="median", sample_size=300, seed=seed)
    for _ in range(4):
        problem.step(optimizer)
    return problem, optimizer


@pytest.mark.parametrize("curvature", ["secant_elementwise", "hutchinson"])
def test_runs_are_reproducible_with_a_fixed_seed(curvature: str) -> None:
    problem, optimizer = _run(curvature, seed=3, global_seed=0)
    again, optimizer_again = _run(curvature, seed=3, global_seed=1)
    other, optimizer_other = _run(curvature, seed=4, global_seed=0)
    for a, b in zip(problem.params, again.params, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert _curvatures(optimizer) == _curvatures(optimizer_again)
    # The 2000-element layer is sampled (300 distinct positions, drawn from the seed), the 200-element one used whole.
    positions = optimizer.state[problem.params[0]]["sample_positions"]
    assert torch.equal(positions, optimizer_again.state[again.params[0]]["sample_positions"])
    assert len(positions.unique()) == 300
    assert "sample_positions" not in optimizer.state[problem.params[1]]
    assert not torch.equal(positions, optimizer_other.state[other.params[0]]["sample_positions"])
    assert _curvatures(optimizer) != _curvatures(optimizer_other)
    assert not all(torch.equal(a, b) for a, b in zip(problem.params, other.params, strict=True))


def test_hutchinson_probes_come_from_the_seed() -> None:
    """Where the Hessian is not diagonal the Rademacher probes change the estimate: the seed fixes them."""
    curvatures = []
    for seed in (3, 3, 4):
        generator = torch.Generator().manual_seed(1)
        problem = Quadratic(SHAPES, [_spd_matrix(math.prod(shape), 0.5, 2.0, generator) for shape in SHAPES])
        optimizer = CBLR(problem.params, curvature="hutchinson", sample_size=None, seed=seed)
        problem.step(optimizer)
        curvatures.append(_curvatures(optimizer))
    assert curvatures[0] == curvatures[1]
    assert all(a != b for a, b in zip(curvatures[0], curvatures[2], strict=True))


def test_invalid_estimates_keep_the_previous_curvature() -> None:
    """The first valid estimate is taken as is, later ones are smoothed by the EMA; negative, NaN and infinite
    estimates keep the previous curvature (``hvp`` on ``scale / 2 |w|^2`` estimates ``scale``)."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(4, 3, generator=generator))
    optimizer = CBLR([param], lr=1e-3, trust=0.1, curvature="hvp", curvature_ema=0.5)
    for scale, expected in [(2.0, 2.0), (-1.0, 2.0), (math.nan, 2.0), (math.inf, 2.0), (4.0, 3.0)]:
        param.grad = torch.randn(4, 3, generator=generator)
        optimizer.step(lambda scale=scale: 0.5 * scale * (param**2).sum())
        stats = optimizer.layer_stats()["group0.0"]
        assert stats["curvature"] == pytest.approx(expected, rel=1e-6)
        assert stats["rate"] == pytest.approx(0.1 / expected, rel=1e-6)
        assert torch.isfinite(param).all()


# -- the denoised secant ---------------------------------------------------------------------------------
def _accumulate(param: nn.Parameter, contributions: list[Tensor]) -> None:
    """Backward passes whose gradients are ``contributions``, accumulated into ``param.grad``."""
    for contribution in contributions:
        (param * contribution).sum().backward()


def test_denoised_secant_measures_the_noise_of_the_accumulated_passes() -> None:
    """Two passes h1, h2: V = |g|^2 (2 rho - 1) with rho = (|h1|^2 + |h2|^2) / |h1 + h2|^2, that is |h1 - h2|^2;
    a ``torch.autograd.grad`` call (a closure, a probe) between them is not a pass."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(8, 4, generator=generator))
    optimizer = CBLR([param], lr=0.1, curvature="secant_denoised")
    h1, h2 = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    param.grad = None
    _accumulate(param, [h1])
    torch.autograd.grad((param * torch.randn(8, 4, generator=generator)).sum(), [param])
    _accumulate(param, [h2])
    optimizer.step()
    torch.testing.assert_close(optimizer.state[param]["grad_noise"], (h1 - h2).square().sum())
    optimizer.zero_grad()
    _accumulate(param, [h1 + h2])  # one pass: no noise estimate, so no curvature estimate this step
    optimizer.step()
    assert "grad_noise" not in optimizer.state[param]


def _noisy_quadratic_rates(curvature: str, steps: int = 40) -> list[float]:
    """SGD-base CBLR on 1/2 |w|^2 (curvature 1) whose gradient comes from 8 passes with independent noise of a fixed
    size: as the weights converge, the noise comes to dominate the gradient. The rates over the steps."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(64, 64, generator=generator))
    optimizer = CBLR([param], lr=1.0, trust=0.5, momentum=0.0, curvature=curvature, curvature_ema=0.0)
    rates, noise_scale = [], float(param.detach().norm()) / 64  # each pass's noise: as large as the first gradient
    for _ in range(steps):
        optimizer.zero_grad()
        passes = 8
        for _ in range(passes):
            noise = torch.randn(64, 64, generator=generator) * noise_scale
            (0.5 * param.square().sum() / passes + (param * noise).sum() / passes).backward()
        optimizer.step()
        rates.append(optimizer.layer_stats()["group0.0"]["rate"])
    return rates


def test_denoised_secant_keeps_the_rates_where_the_plain_secant_collapses() -> None:
    """With gradient noise the plain secant's |g_t - g_(t-1)| is the noise, its curvature grows as the steps shrink and
    the rate falls geometrically; the denoised one keeps the rate near trust / curvature = 0.5."""
    plain, denoised = _noisy_quadratic_rates("secant"), _noisy_quadratic_rates("secant_denoised")
    assert plain[-1] < 1e-3 * plain[2]
    assert all(0.25 < rate < 1.0 for rate in denoised[5:]), denoised


def test_pooled_secant_is_the_ratio_of_the_emas_of_signal_and_squared_step() -> None:
    """``secant_pooled``: c = sqrt(S / D) with S, D the EMAs (factor curvature_ema) of the denoised |g_t - g_(t-1)|^2
    and of |w_t - w_(t-1)|^2, taken by the optimizer as it is; recomputed here from the passes and the weights."""
    generator = torch.Generator().manual_seed(0)
    param = nn.Parameter(torch.randn(32, generator=generator))
    ema = 0.5
    optimizer = CBLR([param], lr=0.05, trust=1.0, momentum=0.0, curvature="secant_pooled", curvature_ema=ema)
    grads, noises, weights, curvatures = [], [], [], []
    for _ in range(4):
        optimizer.zero_grad()
        weights.append(param.detach().clone())
        passes = [5.0 * param.detach() / 2 + 0.1 * torch.randn(32, generator=generator) for _ in range(2)]
        _accumulate(param, passes)
        grads.append(param.grad.clone())
        noises.append((passes[0] - passes[1]).square().sum())
        optimizer.step()
        curvatures.append(optimizer.layer_stats()["group0.0"]["curvature"])
    pooled_signal = pooled_step = 0.0
    for t in range(1, 4):
        signal = (grads[t] - grads[t - 1]).square().sum() - noises[t] - noises[t - 1]
        pooled_signal = ema * pooled_signal + (1 - ema) * signal
        pooled_step = ema * pooled_step + (1 - ema) * (weights[t] - weights[t - 1]).square().sum()
        assert curvatures[t] == pytest.approx(float((pooled_signal / pooled_step).sqrt()), rel=1e-5)
    assert curvatures[0] == 0.0  # no previous gradient: no estimate
    assert 4.0 < curvatures[-1] < 6.0  # the quadratic's curvature is 5


def test_pooled_secant_estimates_where_the_gate_of_the_denoised_one_keeps_none() -> None:
    """Adam base on the noisy quadratic, where the noise comes to dominate the gradient: the denoised secant's gate
    never passes, so its rate stays 1; the pooled secant measures P H, about 1 / (the gradient's noise per element)."""
    def curvatures(curvature: str) -> list[float]:
        generator = torch.Generator().manual_seed(0)
        param = nn.Parameter(torch.randn(64, 64, generator=generator))
        optimizer = CBLR([param], lr=0.05, trust=10.0, base="adam", curvature=curvature, curvature_ema=0.9)
        noise_scale = float(param.detach().norm()) / 64
        result = []
        for _ in range(40):
            optimizer.zero_grad()
            for _ in range(8):
                noise = torch.randn(64, 64, generator=generator) * noise_scale
                (0.5 * param.square().sum() / 8 + (param * noise).sum() / 8).backward()
            optimizer.step()
            result.append(optimizer.layer_stats()["group0.0"]["curvature"])
        return result

    per_element_noise = 1.0 / math.sqrt(8)  # 8 passes, each adding noise of std noise_scale / 8 ~ 1 / 8 per element
    assert all(c == 0.0 for c in curvatures("secant_denoised"))
    pooled = curvatures("secant_pooled")[20:]
    assert all(0.6 / per_element_noise < c < 1.5 / per_element_noise for c in pooled), pooled


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sampled_secant_on_every_element_is_the_layer_secant(weight_decay: float) -> None:
    """SGD base (``P = 1``), the sample every element: ``secant_sampled`` is ``secant``'s ``|dg| / |dw| + beta``, here
    each layer's curvature on an isotropic quadratic."""
    curvatures = SCALES
    problem = Quadratic(SHAPES, _isotropic(SHAPES, curvatures))
    optimizer = CBLR(problem.params, lr=1e-2, weight_decay=weight_decay, curvature="secant_sampled", sample_size=None,
                     curvature_ema=0.0)
    for _ in range(3):
        problem.step(optimizer)
    torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), torch.tensor(curvatures) + weight_decay, rtol=1e-3,
                               atol=0)


@pytest.mark.parametrize("sample_size", [None, 10])
def test_sampled_secant_on_adam_base_preconditions_each_element(sample_size: int | None) -> None:
    r"""Adam base: ``c = sqrt(sum_i (P_i dg_i)^2 / sum_i dw_i^2)`` over the sampled elements, each with its own
    ``P_i = 1 / (sqrt(v_i / b_2) + eps)`` of the step that estimates, against the gradients, weights and moments
    recorded around two steps (a diagonal quadratic with spread curvatures, so ``P`` differs between elements)."""
    generator = torch.Generator().manual_seed(5)
    hessians = [torch.rand(shape, generator=generator) * 10 * h + 0.1 for shape, h in zip(SHAPES, SCALES, strict=True)]
    problem = Quadratic(SHAPES, hessians)
    betas, eps = (0.9, 0.999), 1e-8
    optimizer = CBLR(problem.params, lr=1e-2, base="adam", betas=betas, eps=eps, curvature="secant_sampled",
                     curvature_ema=0.0, sample_size=sample_size)
    weights = [[p.detach().clone() for p in problem.params]]
    grads = [problem.gradients()]
    problem.step(optimizer)
    weights.append([p.detach().clone() for p in problem.params])
    grads.append(problem.gradients())
    problem.step(optimizer)
    expected = []
    for i, param in enumerate(problem.params):
        state = optimizer.state[param]
        positions = state.get("sample_positions", torch.arange(param.numel()))
        preconditioner = 1 / ((state["exp_avg_sq"] / (1 - betas[1] ** 2)).sqrt() + eps)
        grad_change = ((grads[1][i] - grads[0][i]) * preconditioner).reshape(-1)[positions]
        step = (weights[1][i] - weights[0][i]).reshape(-1)[positions]
        expected.append((grad_change.square().sum() / step.square().sum()).sqrt().item())
    if sample_size is not None:
        assert all(optimizer.state[p]["sample_positions"].numel() == sample_size for p in problem.params)
    torch.testing.assert_close(torch.tensor(_curvatures(optimizer)), torch.tensor(expected), rtol=1e-5, atol=0)
