r"""LARS and LAMB are special cases of CBLR: checked against independent implementations of their formulas.

The references below are written from the papers' update rules, not from the package:

- LARS (You et al. 2017): :math:`r = \tau / ((|g| + \beta |w|) / |w| + \epsilon_c)`, :math:`d = g + \beta w`,
  momentum as ``torch.optim.SGD`` (the first step sets the buffer to :math:`r d`), :math:`w \leftarrow w - \eta b`.
- LAMB (You et al. 2019): bias-corrected AdamW direction :math:`u = \hat m / (\sqrt{\hat v} + \epsilon) + \beta w`,
  :math:`r = \tau / (|u| / |w| + \epsilon_c)`, :math:`w \leftarrow w - \eta r u`.

Biases (1-D tensors) get neither weight decay nor the trust ratio, the package's default mask.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from hf_cblr import CBLR, LAMB, LARS

STEPS = 20
LR = 0.5
MOMENTUM = 0.9
WEIGHT_DECAY = 0.01
TRUST = 0.02
CURVATURE_EPS = 1e-8
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-6

GradFn = Callable[[list[Tensor]], list[Tensor]]


def _problem(seed: int = 0) -> tuple[list[Tensor], GradFn]:
    """Initial weights (two weight matrices, two biases) of a tanh MLP, and its loss gradient on fixed data."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(24, 5, generator=generator)
    targets = torch.randn(24, 3, generator=generator)
    weights = [
        torch.randn(7, 5, generator=generator) * 0.5,
        torch.randn(7, generator=generator) * 0.1,
        torch.randn(3, 7, generator=generator) * 0.5,
        torch.randn(3, generator=generator) * 0.1,
    ]

    def gradient(current: list[Tensor]) -> list[Tensor]:
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_() for w in current]
            w1, b1, w2, b2 = leaves
            loss = nn.functional.mse_loss(torch.tanh(inputs @ w1.T + b1) @ w2.T + b2, targets)
            return list(torch.autograd.grad(loss, leaves))

    return weights, gradient


def _train(optimizer_factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer], weights: list[Tensor],
           gradient: GradFn, steps: int = STEPS) -> tuple[list[Tensor], torch.optim.Optimizer]:
    params = [nn.Parameter(w.clone()) for w in weights]
    optimizer = optimizer_factory(params)
    for _ in range(steps):
        for param, grad in zip(params, gradient(params), strict=True):
            param.grad = grad
        optimizer.step()
    return [p.detach() for p in params], optimizer


def _reference_lars(weights: list[Tensor], gradient: GradFn, lr: float, momentum: float, weight_decay: float,
                    trust: float, eps: float) -> tuple[list[Tensor], list[float]]:
    """LARS from its formula; returns the final weights and the last step's ratios."""
    weights = [w.clone() for w in weights]
    buffers: list[Tensor | None] = [None] * len(weights)
    ratios = [1.0] * len(weights)
    for _ in range(STEPS):
        grads = gradient(weights)
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            adapted = w.ndim > 1
            beta = weight_decay if adapted else 0.0
            d = g + beta * w
            if adapted:
                w_norm, g_norm = w.norm().item(), g.norm().item()
                ratios[i] = trust / ((g_norm + beta * w_norm) / w_norm + eps)
            buffers[i] = ratios[i] * d if buffers[i] is None else momentum * buffers[i] + ratios[i] * d
            w -= lr * buffers[i]
    return weights, ratios


def _reference_lamb(weights: list[Tensor], gradient: GradFn, lr: float, betas: tuple[float, float], adam_eps: float,
                    weight_decay: float, trust: float, eps: float) -> tuple[list[Tensor], list[float]]:
    """LAMB from its formula (bias-corrected AdamW direction); returns the final weights and last ratios."""
    beta1, beta2 = betas
    weights = [w.clone() for w in weights]
    m = [torch.zeros_like(w) for w in weights]
    v = [torch.zeros_like(w) for w in weights]
    ratios = [1.0] * len(weights)
    for t in range(1, STEPS + 1):
        grads = gradient(weights)
        for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
            adapted = w.ndim > 1
            beta = weight_decay if adapted else 0.0
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat = m[i] / (1 - beta1**t)
            v_hat = v[i] / (1 - beta2**t)
            u = m_hat / (v_hat.sqrt() + adam_eps) + beta * w
            if adapted:
                ratios[i] = trust / (u.norm().item() / w.norm().item() + eps)
            w -= lr * ratios[i] * u
    return weights, ratios


def _assert_weights_close(actual: list[Tensor], expected: list[Tensor], rtol: float, atol: float) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_is_cblr_with_weight_norm_curvature(nesterov: bool) -> None:
    weights, gradient = _problem()
    lars_weights, lars = _train(lambda p: LARS(p, lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=WEIGHT_DECAY,
                                                trust_coefficient=TRUST, curvature_eps=CURVATURE_EPS), weights, gradient)
    cblr_weights, _ = _train(lambda p: CBLR(p, lr=LR, momentum=MOMENTUM, nesterov=nesterov, weight_decay=WEIGHT_DECAY,
                                            trust=TRUST, curvature="weight_norm", curvature_ema=0.0,
                                            curvature_eps=CURVATURE_EPS, max_ratio=math.inf), weights, gradient)
    # LARS is CBLR with these arguments: the same arithmetic, bit for bit.
    _assert_weights_close(lars_weights, cblr_weights, rtol=0, atol=0)
    assert not any(torch.equal(w, w0) for w, w0 in zip(lars_weights, weights, strict=True))
    if not nesterov:
        reference, ratios = _reference_lars(weights, gradient, LR, MOMENTUM, WEIGHT_DECAY, TRUST, CURVATURE_EPS)
        _assert_weights_close(lars_weights, reference, rtol=1e-5, atol=1e-6)
        rates = [stats["rate"] for stats in lars.layer_stats().values()]
        torch.testing.assert_close(torch.tensor(rates), torch.tensor(ratios), rtol=1e-5, atol=0)
        # Not the trivial case: the trust ratios differ between layers and from 1.
        assert ratios[0] != pytest.approx(ratios[2], rel=0.05) and ratios[0] != pytest.approx(1.0, rel=0.05)


def test_lamb_is_cblr_adam_with_weight_norm_curvature() -> None:
    weights, gradient = _problem()
    lamb_weights, lamb = _train(lambda p: LAMB(p, lr=LR * 0.1, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                                trust_coefficient=TRUST, curvature_eps=CURVATURE_EPS), weights, gradient)
    cblr_weights, _ = _train(lambda p: CBLR(p, lr=LR * 0.1, base="adam", betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                            trust=TRUST, curvature="weight_norm", curvature_ema=0.0,
                                            curvature_eps=CURVATURE_EPS, max_ratio=math.inf), weights, gradient)
    _assert_weights_close(lamb_weights, cblr_weights, rtol=0, atol=0)
    reference, ratios = _reference_lamb(weights, gradient, LR * 0.1, BETAS, ADAM_EPS, WEIGHT_DECAY, TRUST, CURVATURE_EPS)
    _assert_weights_close(lamb_weights, reference, rtol=1e-5, atol=1e-6)
    rates = [stats["rate"] for stats in lamb.layer_stats().values()]
    torch.testing.assert_close(torch.tensor(rates), torch.tensor(ratios), rtol=1e-5, atol=0)
    assert ratios[0] != pytest.approx(ratios[2], rel=0.05) and ratios[0] != pytest.approx(1.0, rel=0.05)


@pytest.mark.parametrize(("momentum", "dampening", "nesterov"), [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.3, False),
                                                                 (0.9, 0.0, True)])
def test_cblr_without_adaptation_is_torch_sgd(momentum: float, dampening: float, nesterov: bool) -> None:
    """With the curvature rate off (r = 1) the SGD base is torch's momentum SGD with coupled weight decay."""
    weights, gradient = _problem()
    kwargs = dict(lr=LR, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=WEIGHT_DECAY)
    ours, _ = _train(lambda p: CBLR(p, **kwargs, adaptation_mask=False, weight_decay_mask=True), weights, gradient)
    torch_sgd, _ = _train(lambda p: torch.optim.SGD(p, **kwargs, foreach=False), weights, gradient)
    _assert_weights_close(ours, torch_sgd, rtol=1e-5, atol=1e-6)


def test_cblr_adam_without_adaptation_is_torch_adamw() -> None:
    """With the curvature rate off the Adam base is torch's AdamW (decoupled weight decay)."""
    weights, gradient = _problem()
    kwargs = dict(lr=0.01, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY)
    ours, _ = _train(lambda p: CBLR(p, base="adam", **kwargs, adaptation_mask=False, weight_decay_mask=True), weights, gradient)
    adamw, _ = _train(lambda p: torch.optim.AdamW(p, **kwargs, foreach=False), weights, gradient)
    _assert_weights_close(ours, adamw, rtol=1e-5, atol=1e-6)
