"""The fused kernels (``fused=True``): the foreach path's numbers, one compiled call per param group, no recompiles per step,
one warning where they cannot compile.

Tiny layers (at most 4096 elements: one size class of Inductor's CPU reductions), so the kernels compile once per
process, one graph per list of layers; the first test that runs them pays the compile.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_optim_reference import (
    ADAM_EPS,
    BETAS,
    CURVATURE_EPS,
    LR,
    MOMENTUM,
    TRUST,
    WEIGHT_DECAY,
    _problem,
    _reference_lamb,
    _reference_lars,
    _train,
)
from torch import Tensor, nn
from torch._dynamo.utils import counters

import hf_cblr
from hf_cblr import CBLR, LAMB, LARS, MCLR
from hf_cblr.optim import _cpu_kernels, _tensor_ops
from hf_cblr.optim._cpu_kernels import cpu_kernels
from hf_cblr.optim._tensor_ops import (
    FOREACH_OPS,
    FUSED_OPS,
    FusedTensorListOps,
    adam_direction_lists,
    adam_update_lists,
    compiled,
    fused_kernels_available,
    momentum_update_lists,
    plain_update_lists,
    replace_lists,
)

STEPS = 20
SHAPES = [(12, 10), (12,), (6, 12), (6,), (3, 4, 5)]
#: Every registry optimizer with every estimator it takes that needs no closure.
CASES = [("cblr", {"curvature": name}) for name in ("weight_norm", "secant", "secant_denoised", "secant_pooled",
                                                    "secant_elementwise", "secant_sampled")]
CASES += [("cblr_adam", kwargs) for _, kwargs in CASES]
CASES += [("mclr", {}), ("mclr_adam", {}), ("lars", {}), ("lamb", {})]
LEARNING_RATES = {"cblr": 0.05, "mclr": 0.05, "lars": 1.0, "cblr_adam": 1e-3, "mclr_adam": 1e-3, "lamb": 1e-2}
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="needs CUDA")])]


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The names of the fused ops' methods as they are called (so a test knows the fused kernels ran)."""
    calls: list[str] = []
    for method in ("adam_direction", "adam_step", "momentum_update"):
        original = getattr(FusedTensorListOps, method)

        def spy(self: FusedTensorListOps, *args: Any, _original: Any = original, _name: str = method) -> Any:
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(FusedTensorListOps, method, spy)
    yield calls


@pytest.fixture(params=["cpu_kernels", "inductor"])
def kernel_route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which kernels the fused path runs on the CPU: the C++ kernels (``hf_cblr/optim/csrc/fused_cpu.cpp``, where they are
    built), or Inductor's compiled kernels, which are the fused path on the GPU and where the C++ kernels cannot be built."""
    if request.param == "inductor":
        monkeypatch.setattr(_tensor_ops, "cpu_kernels", lambda: None)
    elif cpu_kernels() is None:
        pytest.skip("the C++ kernels cannot be built here")
    return request.param


def _model(dtype: torch.dtype, device: str) -> list[tuple[str, nn.Parameter]]:
    generator = torch.Generator().manual_seed(0)
    return [(f"layer{i}", nn.Parameter((torch.randn(shape, generator=generator) * 0.5).to(device, dtype)))
            for i, shape in enumerate(SHAPES)]


def _groups(named: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
    """Two groups: the matrices with weight decay, the vectors without (two learning rates)."""
    return [{"params": [(n, p) for n, p in named if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
            {"params": [(n, p) for n, p in named if p.ndim == 1], "weight_decay": 0.0, "lr_factor": 0.5}]


def _accumulate_gradients(named: list[tuple[str, nn.Parameter]], step: int) -> None:
    """Two backward passes per step (micro-batches: the denoised secant's noise estimate) of a loss whose gradient
    depends on the weights: ``sum_l 0.5 a |w_l|^2 + <h_k, w_l>``."""
    generator = torch.Generator().manual_seed(1000 + step)
    for _ in range(2):
        loss = sum((0.5 * 0.3 * p.float().square() + torch.randn(p.shape, generator=generator).to(p.device) * p.float()).sum()
                   for _, p in named)
        loss.backward()


def _run(name: str, kwargs: dict[str, Any], fused: bool | None, dtype: torch.dtype = torch.float32, device: str = "cpu",
         steps: int = STEPS) -> tuple[list[Tensor], torch.optim.Optimizer]:
    named = _model(dtype, device)
    optimizer = hf_cblr.create_optimizer(_groups(named), name, lr=LEARNING_RATES[name], fused=fused, **kwargs)
    for step in range(steps):
        for group in optimizer.param_groups:  # a changing learning rate
            group["lr"] = LEARNING_RATES[name] * group.get("lr_factor", 1.0) * (1 - 0.5 * step / steps)
        _accumulate_gradients(named, step)
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach().clone() for _, p in named], optimizer


def _assert_relatively_close(actual: list[Tensor], expected: list[Tensor], tolerance: float = 1e-6) -> None:
    for a, e in zip(actual, expected, strict=True):
        error = ((a.double() - e.double()).norm() / e.double().norm()).item()
        assert error <= tolerance, f"relative difference {error:.2e} > {tolerance:.0e}"


def _element_state(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [value for state in optimizer.state.values() for key, value in sorted(state.items())
            if isinstance(value, Tensor) and value.ndim > 0 and key != "sample_positions"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=[f"{n}-{k.get('curvature', 'default')}" for n, k in CASES])
def test_fused_equals_foreach_over_20_steps(name: str, kwargs: dict[str, Any], dtype: torch.dtype, device: str,
                                            kernel_route: str, kernel_calls: list[str]) -> None:
    fused_weights, fused = _run(name, kwargs, True, dtype, device)
    assert kernel_calls, "the fused kernels did not run"
    foreach_weights, foreach = _run(name, kwargs, False, dtype, device)
    initial = [p.detach() for _, p in _model(dtype, device)]
    assert not any(torch.equal(w, w0) for w, w0 in zip(foreach_weights, initial, strict=True))
    _assert_relatively_close(fused_weights, foreach_weights)
    _assert_relatively_close(_element_state(fused), _element_state(foreach))
    fused_rates = [stats["rate"] for stats in fused.layer_stats().values()]
    foreach_rates = [stats["rate"] for stats in foreach.layer_stats().values()]
    assert fused_rates == pytest.approx(foreach_rates, rel=1e-5)


def test_lars_and_lamb_equalities_hold_on_the_fused_kernels(kernel_route: str, kernel_calls: list[str]) -> None:
    """``tests/test_optim_reference.py``'s equalities: LARS and LAMB are CBLR with the weight-norm curvature, bit for bit,
    and match their papers' formulas; here on the fused kernels."""
    weights, gradient = _problem()
    for nesterov in (False, True):
        lars_weights, _ = _train(lambda p, n=nesterov: LARS(p, lr=LR, momentum=MOMENTUM, nesterov=n, weight_decay=WEIGHT_DECAY,
                                                              trust_coefficient=TRUST, curvature_eps=CURVATURE_EPS, fused=True),
                                 weights, gradient)
        cblr_weights, _ = _train(lambda p, n=nesterov: CBLR(p, lr=LR, momentum=MOMENTUM, nesterov=n, weight_decay=WEIGHT_DECAY,
                                                              trust=TRUST, curvature="weight_norm", curvature_ema=0.0,
                                                              curvature_eps=CURVATURE_EPS, max_ratio=math.inf, fused=True),
                                 weights, gradient)
        for a, b in zip(lars_weights, cblr_weights, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    lars_weights, _ = _train(lambda p: LARS(p, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, trust_coefficient=TRUST,
                                            curvature_eps=CURVATURE_EPS, fused=True), weights, gradient)
    reference, _ = _reference_lars(weights, gradient, LR, MOMENTUM, WEIGHT_DECAY, TRUST, CURVATURE_EPS)
    for a, b in zip(lars_weights, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "momentum_update" in kernel_calls

    lamb_weights, _ = _train(lambda p: LAMB(p, lr=LR * 0.1, betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                            trust_coefficient=TRUST, curvature_eps=CURVATURE_EPS, fused=True), weights, gradient)
    cblr_weights, _ = _train(lambda p: CBLR(p, lr=LR * 0.1, base="adam", betas=BETAS, eps=ADAM_EPS, weight_decay=WEIGHT_DECAY,
                                            trust=TRUST, curvature="weight_norm", curvature_ema=0.0,
                                            curvature_eps=CURVATURE_EPS, max_ratio=math.inf, fused=True), weights, gradient)
    reference, _ = _reference_lamb(weights, gradient, LR * 0.1, BETAS, ADAM_EPS, WEIGHT_DECAY, TRUST, CURVATURE_EPS)
    for a, b, r in zip(lamb_weights, cblr_weights, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    assert "adam_direction" in kernel_calls


@pytest.mark.parametrize(("name", "kwargs"), [("lars", {}), ("cblr_adam", {"curvature": "secant"}), ("mclr", {})])
def test_fused_resume_is_bit_exact(name: str, kwargs: dict[str, Any], kernel_route: str, kernel_calls: list[str]) -> None:
    """10 steps, a state dict, 10 more steps; a new optimizer loading that state dict takes the same 10 steps, bit for bit."""
    named = _model(torch.float32, "cpu")
    optimizer = hf_cblr.create_optimizer(_groups(named), name, lr=LEARNING_RATES[name], fused=True, **kwargs)
    for step in range(10):
        _accumulate_gradients(named, step)
        optimizer.step()
        optimizer.zero_grad()
    saved_weights = [p.detach().clone() for _, p in named]
    saved_state = copy.deepcopy(optimizer.state_dict())
    for step in range(10, 20):
        _accumulate_gradients(named, step)
        optimizer.step()
        optimizer.zero_grad()
    continued = [p.detach().clone() for _, p in named]

    for (_, p), saved in zip(named, saved_weights, strict=True):
        p.data.copy_(saved)
    resumed = hf_cblr.create_optimizer(_groups(named), name, lr=LEARNING_RATES[name], fused=True, **kwargs)
    resumed.load_state_dict(saved_state)
    for step in range(10, 20):
        _accumulate_gradients(named, step)
        resumed.step()
        resumed.zero_grad()
    assert kernel_calls
    for (_, p), expected in zip(named, continued, strict=True):
        assert torch.equal(p.detach(), expected)


@pytest.mark.parametrize(("name", "kwargs"), [("lars", {}), ("cblr", {"momentum": 0.0, "curvature": "secant"}),
                                              ("cblr_adam", {"curvature": "secant"}), ("lamb", {})])
def test_no_recompiles_over_20_steps(name: str, kwargs: dict[str, Any], kernel_calls: list[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """After the first step, 19 steps with a changing lr, changing rates and a second param group (other sizes, other
    weight decay) compile no new graph (Inductor's kernels; the C++ kernels compile nothing per step)."""
    monkeypatch.setattr(_tensor_ops, "cpu_kernels", lambda: None)
    _run(name, kwargs, True, steps=1)  # compiles what this configuration needs (if an earlier test has not)
    graphs_before = counters["stats"]["unique_graphs"]
    calls_before = len(kernel_calls)
    _, optimizer = _run(name, kwargs, True, steps=STEPS)
    assert len(kernel_calls) - calls_before >= STEPS * len(optimizer.param_groups)
    rates = {stats["rate"] for stats in optimizer.layer_stats().values()}
    assert len(rates) > 2  # the layers' rates differ (and with them the kernels' inputs)
    assert counters["stats"]["unique_graphs"] == graphs_before


@pytest.mark.parametrize(("name", "kwargs"), [("lars", {}), ("cblr_adam", {"curvature": "secant"})])
def test_one_compiled_call_per_param_group_and_step(name: str, kwargs: dict[str, Any], kernel_route: str,
                                                    kernel_calls: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernels take all the layers of a param group in one compiled call (horizontally fused), where the foreach
    path takes chunks of a few layers: with chunks of at most 40 elements (one layer each), still one call per group."""
    monkeypatch.setattr(_tensor_ops, "CPU_CHUNK_ELEMENTS", 40)
    _, optimizer = _run(name, kwargs, True, steps=3)
    assert len(kernel_calls) == 3 * len(optimizer.param_groups)


def test_without_a_compiler_fused_falls_back_to_foreach_with_one_warning(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kernel_calls: list[str]) -> None:
    """torch.compile compiles on a kernel's first call: a machine without a C++ compiler (or Triton) fails there, and so
    does the build of the C++ kernels."""
    from torch.utils import cpp_extension

    def compile_without_compiler(function: Any, **options: Any) -> Any:
        def failing(*args: Any) -> Any:
            raise RuntimeError("InductorError: CppCompileError: no C++ compiler found (g++, clang++)")
        return failing

    def load_without_compiler(**options: Any) -> Any:
        raise RuntimeError("Error building extension: c++: command not found")

    fused_kernels_available.cache_clear()
    cpu_kernels.cache_clear()
    monkeypatch.setattr(torch, "compile", compile_without_compiler)
    monkeypatch.setattr(cpp_extension, "load", load_without_compiler)
    try:
        with caplog.at_level(logging.WARNING, logger=_tensor_ops.__name__):
            fused_weights, _ = _run("cblr_adam", {"curvature": "secant"}, True, steps=3)
            lars_weights, _ = _run("lars", {}, True, steps=3)
    finally:
        fused_kernels_available.cache_clear()
        cpu_kernels.cache_clear()
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "foreach kernels" in warnings[0].getMessage()
    assert kernel_calls == []
    for actual, expected in ((fused_weights, _run("cblr_adam", {"curvature": "secant"}, False, steps=3)[0]),
                             (lars_weights, _run("lars", {}, False, steps=3)[0])):
        for a, e in zip(actual, expected, strict=True):
            assert torch.equal(a, e)


def test_fused_is_a_validated_setting_of_every_registry_optimizer() -> None:
    params = [nn.Parameter(torch.ones(2, 2))]
    for cls in (CBLR, MCLR, LARS, LAMB):
        assert cls(params, fused=True).fused is True
        assert cls(params).fused is None
    assert all(hf_cblr.get_optimizer_info(name).config(fused=True).fused for name in hf_cblr.list_optimizers())
    with pytest.raises(TypeError, match="fused must be None, True or False"):
        CBLR(params, fused="yes")
    with pytest.raises(ValueError, match="fused=True and foreach=True"):
        LAMB(params, fused=True, foreach=True)


#: Layer sizes for the kernels' own tests: one element, a vector, and layers across the C++ kernels' chunks of 2^15.
KERNEL_SIZES = [1, 7, 300, 40_000, 70_001]


def _lists(dtype: torch.dtype, count: int, positive: tuple[int, ...] = ()) -> list[list[Tensor]]:
    generator = torch.Generator().manual_seed(7)
    return [[(torch.randn(n, generator=generator, dtype=torch.float64).abs() if k in positive
              else torch.randn(n, generator=generator, dtype=torch.float64)).to(dtype) for n in KERNEL_SIZES]
            for k in range(count)]


def _clones(lists: list[list[Tensor]]) -> list[list[Tensor]]:
    return [[t.clone() for t in ts] for ts in lists]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("one_minus_beta1", [0.1, 0.7], ids=["lerp-low", "lerp-high"])
def test_cpu_kernels_equal_inductor_kernels(dtype: torch.dtype, one_minus_beta1: float) -> None:
    """Each C++ kernel computes what its Python kernel computes (compiled by Inductor): the same moments, weights and
    sums (to 1e-6 relative per layer in fp32: the compilers round differently, e.g. in fused multiply-adds), across
    both branches of torch's lerp, layers of one element and layers over several chunks."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("the C++ kernels cannot be built here")
    tolerance = {"rtol": 1e-6, "atol": 0} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}
    layers = len(KERNEL_SIZES)
    generator = torch.Generator().manual_seed(3)
    adam_rows = torch.tensor([[one_minus_beta1, 0.999, 0.001, 1e-8, a, b] for a, b in
                              torch.rand(layers, 2, generator=generator, dtype=torch.float64).tolist()], dtype=dtype)
    factors = torch.rand(layers, generator=generator, dtype=torch.float64).to(dtype) * 1e-2
    grads, weights, exp_avgs, exp_avg_sqs = _lists(dtype, 4, positive=(3,))
    ours, theirs = _clones([weights, exp_avgs, exp_avg_sqs]), _clones([weights, exp_avgs, exp_avg_sqs])
    sums = kernels.adam_direction(grads, ours[0], ours[1], ours[2], adam_rows.double())
    expected = compiled(adam_direction_lists)(grads, theirs[0], theirs[1], theirs[2], adam_rows)
    torch.testing.assert_close(sums.to(dtype), expected, **tolerance)
    kernels.adam_update(ours[0], ours[1], ours[2], adam_rows.double(), factors.double())
    compiled(adam_update_lists)(theirs[0], theirs[1], theirs[2], adam_rows, factors)
    for mine, reference in zip(ours, theirs, strict=True):
        _assert_relatively_close(mine, reference, tolerance["rtol"])

    for nesterov in (False, True):
        momentum_rows = torch.tensor([[0.01 * i, 0.5 + i, 0.1, 0.9, 0.9, 1.0 if nesterov else 0.0, 0.9 if nesterov else 1.0]
                                      for i in range(layers)], dtype=dtype)
        grads, weights, buffers = _lists(dtype, 3)
        ours, theirs = _clones([weights, buffers]), _clones([weights, buffers])
        sums = kernels.momentum_update(grads, ours[0], ours[1], momentum_rows.double())
        expected = compiled(momentum_update_lists)(grads, theirs[0], theirs[1], momentum_rows)
        torch.testing.assert_close(sums.to(dtype), expected, **tolerance)
        for mine, reference in zip(ours, theirs, strict=True):
            _assert_relatively_close(mine, reference, tolerance["rtol"])
    ours, theirs = [w.clone() for w in weights], [w.clone() for w in weights]
    sums = kernels.momentum_update(grads, ours, [], momentum_rows.double())
    expected = compiled(plain_update_lists)(grads, theirs, momentum_rows)
    torch.testing.assert_close(sums.to(dtype), expected, **tolerance)
    _assert_relatively_close(ours, theirs, tolerance["rtol"])

    previous, current = _lists(dtype, 2)
    ours, theirs = [p.clone() for p in previous], [p.clone() for p in previous]
    sums = kernels.replace_and_difference_squares(ours, current)
    expected = compiled(replace_lists)(theirs, current)
    torch.testing.assert_close(sums[:, 0].to(dtype), expected, **tolerance)
    torch.testing.assert_close(sums[:, 1].to(dtype), FOREACH_OPS.norms(current).square(), **tolerance)
    assert all(torch.equal(a, c) and torch.equal(b, c) for a, b, c in zip(ours, theirs, current, strict=True))

    torch.testing.assert_close(FUSED_OPS.norms(grads), FOREACH_OPS.norms(grads), **tolerance)

    for xs, ys in ((grads, grads), (grads, previous)):  # fp64 products summed in fp64: equal to the summation order
        torch.testing.assert_close(FUSED_OPS.fp64_dots(xs, ys), FOREACH_OPS.fp64_dots(xs, ys), rtol=1e-12, atol=1e-9)
    positions = [torch.randperm(g.numel())[: g.numel() // 3].sort().values for g in grads[:-1]] + [None]
    for mine, reference in zip(FUSED_OPS.gather(grads, positions), FOREACH_OPS.gather(grads, positions), strict=True):
        assert torch.equal(mine, reference)


def test_where_the_cpu_kernels_cannot_be_built_fused_runs_inductors_kernels(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, kernel_calls: list[str]) -> None:
    """A failed build (no ninja, a compiler error) logs its reason once, at INFO, and no warning: ``fused=True`` then
    runs Inductor's kernels, which give the C++ kernels' numbers, and the default path the foreach kernels."""
    from torch.utils import cpp_extension

    def failing_load(**options: Any) -> Any:
        raise RuntimeError("Ninja is required to load C++ extensions")

    expected, _ = _run("lamb", {}, True, steps=3)
    cpu_kernels.cache_clear()
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    try:
        with caplog.at_level(logging.INFO, logger=_cpu_kernels.__name__):
            weights, _ = _run("lamb", {}, True, steps=3)
            _run("lars", {}, True, steps=3)
            assert "adam_direction" in kernel_calls and "momentum_update" in kernel_calls
            kernel_calls.clear()
            default_weights, _ = _run("lamb", {}, None, steps=3)
    finally:
        cpu_kernels.cache_clear()
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]
    reasons = [record.getMessage() for record in caplog.records if "cannot be built" in record.getMessage()]
    assert len(reasons) == 1 and "Ninja is required" in reasons[0]
    assert kernel_calls == []  # the default: the foreach kernels
    _assert_relatively_close(weights, expected)
    _assert_relatively_close(default_weights, expected)


def test_the_default_runs_the_fused_kernels_where_they_were_measured_faster(kernel_calls: list[str]) -> None:
    """``fused=None``: the fused kernels on whole fp32 layers on the CPU (where the C++ kernels build); the foreach kernels
    for bf16 parameters, and wherever ``foreach`` or ``fused`` is named."""
    if cpu_kernels() is None:
        pytest.skip("the C++ kernels cannot be built here")
    for name in ("lamb", "lars", "mclr_adam"):
        kernel_calls.clear()
        default_weights, _ = _run(name, {}, None, steps=3)
        assert kernel_calls, name
        _assert_relatively_close(default_weights, _run(name, {}, True, steps=3)[0], 0.0)
        kernel_calls.clear()
        _run(name, {}, None, torch.bfloat16, steps=3)
        _run(name, {"foreach": True}, None, steps=3)
        _run(name, {"foreach": False}, None, steps=3)
        _run(name, {}, False, steps=3)
        assert kernel_calls == [], name


@pytest.fixture
def norm_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The lengths of the tensor lists the fused ops take norm passes over, as they are called."""
    calls: list[int] = []
    original = FusedTensorListOps.norms

    def spy(self: FusedTensorListOps, xs: Any) -> Any:
        calls.append(len(xs))
        return original(self, xs)

    monkeypatch.setattr(FusedTensorListOps, "norms", spy)
    yield calls


def test_lamb_takes_the_weight_norms_from_the_adam_pass(kernel_calls: list[str], norm_calls: list[int]) -> None:
    """On the fused kernels LAMB's ``|w|`` comes out of the Adam reduction pass, which reads ``w`` anyway: no norm pass
    over the weights (the batch's sums remember the norms a kernel took, ``LayerSums.add_norms``)."""
    weights, _ = _run("lamb", {}, True, steps=3)
    assert "adam_direction" in kernel_calls and norm_calls == []
    _assert_relatively_close(weights, _run("lamb", {}, False, steps=3)[0])


def test_the_secant_takes_the_gradient_norms_from_its_replace_pass(norm_calls: list[int]) -> None:
    """On the C++ kernels the secant's pass over ``g_{t-1}`` and ``g_t`` also takes ``|g_t|``, which the SGD direction
    reads: from the second step (the first with a previous gradient) the step takes no norm pass, with the numbers of
    the foreach kernels."""
    if cpu_kernels() is None:
        pytest.skip("the C++ kernels cannot be built here")
    for name, kwargs in (("cblr", {"curvature": "secant"}), ("cblr", {"curvature": "secant_pooled"})):
        _run(name, kwargs, True, steps=1)
        first_step = len(norm_calls)
        norm_calls.clear()
        weights, optimizer = _run(name, kwargs, True, steps=4)
        assert first_step > 0 and len(norm_calls) == first_step, kwargs
        norm_calls.clear()
        foreach_weights, foreach = _run(name, kwargs, False, steps=4)
        _assert_relatively_close(weights, foreach_weights)
        assert [s["grad_norm"] for s in optimizer.layer_stats().values()] == pytest.approx(
            [s["grad_norm"] for s in foreach.layer_stats().values()], rel=1e-6)


@pytest.mark.parametrize("name", ["mclr_adam", "cblr_adam"])
def test_adam_with_sampled_curvatures_takes_one_pass(name: str, kernel_route: str, kernel_calls: list[str]) -> None:
    """The element-wise secant reads only the preconditioner at its samples: the Adam base's reduction and update passes
    are then one (``adam_step``), with the numbers of the two passes and of the foreach kernels; the rates' statistics
    (gradient norms) are the update pass's."""
    kwargs = {} if name == "mclr_adam" else {"curvature": "secant_elementwise"}
    weights, optimizer = _run(name, kwargs, True)
    assert set(kernel_calls) == {"adam_step"}
    foreach_weights, foreach = _run(name, kwargs, False)
    _assert_relatively_close(weights, foreach_weights)
    for key in ("rate", "grad_norm", "update_norm"):
        assert [s[key] for s in optimizer.layer_stats().values()] == pytest.approx(
            [s[key] for s in foreach.layer_stats().values()], rel=1e-5), key
