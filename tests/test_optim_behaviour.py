"""Behaviour of every registry optimizer with every estimator: kernel paths, precision, checkpoints, errors,
degenerate inputs, masks and diagnostics."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hf_cblr import CBLR, LAMB, LARS, MCLR, create_optimizer, get_optimizer_info, list_optimizers, param_groups
from hf_cblr.optim import CURVATURE_ESTIMATORS
from hf_cblr.optim import _tensor_ops as tensor_ops
from hf_cblr.optim.layer_sources import LocalLayers
from hf_cblr.optim.registry import check_optimizer_kwargs

#: Hyperparameters with which each optimizer trains the regression of ``conftest.Regression`` in 20 steps.
TRAIN_KWARGS: dict[str, dict[str, Any]] = {
    "cblr": dict(lr=0.1, trust=1.0),
    "mclr": dict(lr=0.1),
    "lars": dict(lr=1.0, trust_coefficient=0.02),
    "cblr_adam": dict(lr=0.05, trust=0.1),
    "mclr_adam": dict(lr=0.05),
    "lamb": dict(lr=0.05),
}


def _options(config: Any, **kwargs: Any) -> dict[str, Any]:
    """Training hyperparameters plus weight decay, and a small element sample where the optimizer takes one,
    so that the 96-element weight of the regression is sampled."""
    options = {**TRAIN_KWARGS[config.name], "weight_decay": 0.01, **kwargs}
    if "sample_size" in get_optimizer_info(config.name).valid_kwargs():
        options.setdefault("sample_size", 20)
    return options


def _floating_state(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]


# -- kernel paths, precision, checkpoints ---------------------------------------------------------------


def test_registry_lists_the_six_optimizers() -> None:
    assert list_optimizers() == ["cblr", "cblr_adam", "lamb", "lars", "mclr", "mclr_adam"]
    for name, cls, base in [("cblr", CBLR, "sgd"), ("cblr_adam", CBLR, "adam"), ("lamb", LAMB, "adam"), ("lars", LARS, "sgd"),
                            ("mclr", MCLR, "sgd"), ("mclr_adam", MCLR, "adam")]:
        optimizer = create_optimizer([nn.Parameter(torch.ones(2, 2))], name)
        assert type(optimizer) is cls and optimizer.base == base and get_optimizer_info(name).base == base


@pytest.mark.parametrize("accelerator_kernels", [False, True])
def test_foreach_matches_single_tensor(optimizer_config: Any, make_regression: Callable[..., Any], accelerator_kernels: bool,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerator_kernels``: the foreach path as off the CPU, where a quotient cannot be written into its divisor."""
    if accelerator_kernels:
        monkeypatch.setattr(tensor_ops, "_on_cpu", lambda tensors: False)
    params = {}
    for foreach in (True, False):
        problem = make_regression()
        optimizer = optimizer_config.create(problem.model, **_options(optimizer_config, foreach=foreach))
        for _ in range(5):
            problem.step(optimizer)
        params[foreach] = problem.parameters()
    for a, b, initial in zip(params[True], params[False], make_regression().parameters(), strict=True):
        assert not torch.equal(a, initial)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [True, False])
def test_chunked_step_matches_whole_batch_step(optimizer_config: Any, make_regression: Callable[..., Any], foreach: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the step runs over chunks of whole layers (``LayerBatch.chunks``); chunks of one or two of the
    regression's layers give the numbers of the whole batch at once."""
    params = {}
    for chunk_elements in (40, 1 << 30):
        monkeypatch.setattr(tensor_ops, "CPU_CHUNK_ELEMENTS", chunk_elements)
        problem = make_regression()
        optimizer = optimizer_config.create(problem.model, **_options(optimizer_config, foreach=foreach))
        for _ in range(5):
            problem.step(optimizer)
        params[chunk_elements] = problem.parameters()
        # weights of 96 and 48 elements; biases and norm scales of 16, 16, 16, 3
        batches = LocalLayers().batches(optimizer.param_groups, optimizer.state, new_state=optimizer.parts.new_state,
                                        schema=optimizer.state_schema, foreach=foreach, rates_need_all_layers=False,
                                        optimizer_name="", estimator=optimizer.estimator)
        chunks = [len(batch.chunks(tensor_ops.chunk_elements(batch.params))) for batch in batches]
        assert chunks == ([1] * len(batches) if chunk_elements > 40 else [2, 2])
    for a, b, initial in zip(params[40], params[1 << 30], make_regression().parameters(), strict=True):
        assert not torch.equal(a, initial)
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_train_with_fp32_state(optimizer_config: Any, make_regression: Callable[..., Any],
                                                       dtype: torch.dtype) -> None:
    problem = make_regression(dtype=dtype)
    optimizer = optimizer_config.create(problem.model, **_options(optimizer_config))
    losses = [problem.step(optimizer) for _ in range(20)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == dtype for p in problem.model.parameters())
    state = _floating_state(optimizer)
    assert state and all(v.dtype == torch.float32 for v in state)


def _checkpoint_round_trip(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, Any]:
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer)


@pytest.mark.parametrize(("saved", "loaded", "named"), [
    ({"curvature": "secant"}, {"curvature": "weight_norm"}, "curvature"),
    ({"base": "adam"}, {"base": "sgd"}, "base"),
    ({"curvature": "secant_elementwise", "seed": 0}, {"curvature": "secant_elementwise", "seed": 1}, "seed"),
    ({"curvature": "secant_elementwise", "sample_size": 8}, {"curvature": "secant_elementwise"}, "sample_size"),
])
def test_state_saved_with_other_estimator_settings_is_refused(make_regression: Callable[..., Any], saved: dict[str, Any],
                                                             loaded: dict[str, Any], named: str) -> None:
    problem = make_regression()
    optimizer = CBLR(problem.model.parameters(), lr=0.01, **saved)
    problem.step(optimizer)
    other = CBLR(problem.model.parameters(), lr=0.01, **loaded)
    with pytest.raises(ValueError, match=f"saved with .*'{named}'.*build the optimizer with the saved values"):
        other.load_state_dict(optimizer.state_dict())
    assert not other.state  # nothing was loaded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bit_identical(optimizer_config: Any, make_regression: Callable[..., Any],
                                            dtype: torch.dtype) -> None:
    problem = make_regression(dtype=dtype)
    optimizer = optimizer_config.create(problem.model, **_options(optimizer_config))
    for _ in range(3):
        problem.step(optimizer)
    checkpoint = _checkpoint_round_trip(optimizer, problem.model)
    saved_keys = {key for state in checkpoint["optimizer"]["state"].values() for key in state}
    if optimizer_config.curvature == "secant":
        assert "prev_grad" in saved_keys
    if optimizer_config.curvature in ("secant_elementwise", "hutchinson"):
        assert "sample_positions" in saved_keys
    for _ in range(3):
        problem.step(optimizer)

    resumed = make_regression(dtype=dtype)
    resumed.model.load_state_dict(checkpoint["model"])
    fresh = make_regression(dtype=dtype)
    fresh.model.load_state_dict(checkpoint["model"])
    resumed_optimizer = optimizer_config.create(resumed.model, **_options(optimizer_config))
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    fresh_optimizer = optimizer_config.create(fresh.model, **_options(optimizer_config))
    for _ in range(3):
        resumed.step(resumed_optimizer)
        fresh.step(fresh_optimizer)

    for a, b in zip(problem.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert optimizer.layer_stats() == resumed_optimizer.layer_stats()
    for param, resumed_param in zip(problem.model.parameters(), resumed.model.parameters(), strict=True):
        state, resumed_state = optimizer.state[param], resumed_optimizer.state[resumed_param]
        assert state.keys() == resumed_state.keys()
        for key, value in state.items():
            assert value.dtype == resumed_state[key].dtype and torch.equal(value, resumed_state[key]), key
    # The optimizer state matters: a fresh optimizer from the same weights does not continue the run.
    assert not all(torch.equal(a, b) for a, b in zip(problem.parameters(), fresh.parameters(), strict=True))


# -- bad inputs ---------------------------------------------------------------------------------------


def _param() -> nn.Parameter:
    return nn.Parameter(torch.randn(3, 2))


@pytest.mark.parametrize(("optimizer_class", "kwargs", "error", "match"), [
    (CBLR, dict(lr=-0.1), ValueError, r"lr must be in \[0.0, inf\), got -0.1"),
    (CBLR, dict(lr=math.nan), ValueError, r"lr must be in \[0.0, inf\), got nan"),
    (CBLR, dict(lr=math.inf), ValueError, r"lr must be in \[0.0, inf\), got inf"),
    (CBLR, dict(lr="0.1"), TypeError, "lr must be a number"),
    (CBLR, dict(momentum=-0.1), ValueError, r"momentum must be in \[0.0, 1.0\), got -0.1"),
    (CBLR, dict(momentum=1.0), ValueError, r"momentum must be in \[0.0, 1.0\), got 1.0"),
    (CBLR, dict(momentum=math.nan), ValueError, "momentum must be in"),
    (CBLR, dict(curvature="newton"), ValueError, r"curvature='newton' is not a known estimator; valid values: \['fd', "),
    (CBLR, dict(aggregate="max"), ValueError, r"aggregate='max' is not valid; valid values: \['mean', 'median'\]"),
    (CBLR, dict(base="rmsprop"), ValueError, r"base='rmsprop' is not valid; valid values: \['sgd', 'adam'\]"),
    (CBLR, dict(trust=0.0), ValueError, "trust must be in"),
    (CBLR, dict(weight_decay=-1.0), ValueError, "weight_decay must be in"),
    (CBLR, dict(betas=(0.9, 1.0)), ValueError, r"betas\[1\] must be in"),
    (CBLR, dict(nesterov=True, momentum=0.0), ValueError, "nesterov=True requires momentum > 0"),
    (CBLR, dict(curvature="secant", update_interval=2), ValueError, "update_interval=2 applies to the closure estimators"),
    (MCLR, dict(curvature="secant"), ValueError, r"curvature='secant' is not valid; valid values: \['hutchinson', "),
    (MCLR, dict(aggregate="mean"), ValueError, "MCLR aggregates by the median"),
    (LARS, dict(lr=-1.0), ValueError, "lr must be in"),
    (LARS, dict(momentum=1.5), ValueError, "momentum must be in"),
    (LAMB, dict(lr=math.inf), ValueError, "lr must be in"),
])
def test_bad_arguments_raise_naming_the_argument(optimizer_class: type, kwargs: dict[str, Any], error: type[Exception],
                                                 match: str) -> None:
    with pytest.raises(error, match=match):
        optimizer_class([_param()], **kwargs)


def test_bad_param_group_values_raise() -> None:
    with pytest.raises(ValueError, match="lr must be in"):
        CBLR([{"params": [_param()], "lr": -1.0}])
    optimizer = CBLR([_param()])
    with pytest.raises(ValueError, match="momentum must be in"):
        optimizer.add_param_group({"params": [_param()], "momentum": 1.0})


@pytest.mark.parametrize("curvature", sorted(name for name, cls in CURVATURE_ESTIMATORS.items() if cls.needs_closure))
def test_closure_estimators_without_closure_raise_type_error(curvature: str) -> None:
    param = _param()
    optimizer = CBLR([param], curvature=curvature)
    param.grad = torch.ones_like(param)
    with pytest.raises(TypeError, match=f"curvature='{curvature}' needs a closure: call optimizer.step\\(closure\\)"):
        optimizer.step()
    assert torch.equal(param.grad, torch.ones_like(param))


def test_create_optimizer_rejects_unknown_names_and_arguments() -> None:
    with pytest.raises(ValueError, match=r"optimizer name 'adamw' is not registered; valid values: \['cblr', "):
        create_optimizer([_param()], "adamw")
    with pytest.raises(TypeError, match=r"optimizer 'cblr' does not take argument\(s\) \['not_an_argument'\]"):
        create_optimizer([_param()], "cblr", not_an_argument=1)
    with pytest.raises(TypeError, match=r"optimizer 'lars' does not take argument\(s\) \['curvature', 'trust'\]"):
        create_optimizer([_param()], "lars", curvature="secant", trust=0.1)
    with pytest.raises(TypeError, match=r"\['base'\]"):  # the name fixes the base
        check_optimizer_kwargs("cblr_adam", {"base": "sgd", "lr": 0.1})


def test_closure_estimators_estimate_every_update_interval_steps() -> None:
    param = _param()
    calls = []

    def closure() -> Tensor:
        calls.append(None)
        return 0.5 * (param**2).sum()

    optimizer = CBLR([param], curvature="hvp", update_interval=3)
    for _ in range(7):
        param.grad = param.detach().clone()
        optimizer.step(closure)
    assert len(calls) == 3  # steps 1, 4 and 7
    assert optimizer.layer_stats()["group0.0"]["curvature"] == pytest.approx(1.0, rel=1e-5)


# -- degenerate inputs --------------------------------------------------------------------------------


def _degenerate_problem(case: str) -> tuple[nn.Module, Callable[[], Tensor]]:
    """``zero_weights``: all weights 0, nonzero gradients; ``zero_grads``: random weights, gradient 0 (the loss
    compares the output with itself, detached); ``both``."""
    generator = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 5, generator=generator), torch.randn(8, 3, generator=generator)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    if case in ("zero_weights", "both"):
        model = nn.Linear(5, 3)
        nn.init.zeros_(model.weight)
        nn.init.zeros_(model.bias)

    def loss() -> Tensor:
        outputs = model(inputs)
        reference = outputs.detach() if case in ("zero_grads", "both") else targets
        return nn.functional.mse_loss(outputs, reference)

    return model, loss


@pytest.mark.parametrize("case", ["zero_weights", "zero_grads", "both"])
def test_zero_weights_and_gradients_give_finite_steps(optimizer_config: Any, case: str) -> None:
    model, loss = _degenerate_problem(case)
    optimizer = optimizer_config.create(model, **_options(optimizer_config))
    for _ in range(4):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step(loss if optimizer_config.needs_closure else None)
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert all(math.isfinite(value) for stats in optimizer.layer_stats().values() for value in stats.values())
        assert all(torch.isfinite(v).all() for v in _floating_state(optimizer))
    if case == "both":  # nothing to move
        assert all(torch.equal(p, torch.zeros_like(p)) for p in model.parameters())
    if case == "zero_weights":  # the gradient moved them
        assert all(p.abs().sum() > 0 for p in model.parameters())


# -- masks, names and diagnostics ---------------------------------------------------------------------


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_one_dimensional_tensors_get_neither_decay_nor_adaptation_by_default(base: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(4, 3, generator=generator)), nn.Parameter(torch.randn(4, generator=generator))
    weight.grad, bias.grad = torch.randn(4, 3, generator=generator), torch.randn(4, generator=generator)
    w0, b0 = weight.detach().clone(), bias.detach().clone()
    lr, beta, trust, eps, curvature_eps = 0.1, 0.5, 0.3, 1e-8, 1e-8
    optimizer = CBLR([weight, bias], lr=lr, momentum=0.0, weight_decay=beta, trust=trust, curvature="weight_norm", base=base,
                     eps=eps, curvature_eps=curvature_eps)
    optimizer.step()
    stats = optimizer.layer_stats()
    assert stats["group0.1"]["rate"] == 1.0
    if base == "sgd":
        direction, bias_direction = weight.grad + beta * w0, bias.grad
        curvature = (weight.grad.norm() + beta * w0.norm()) / w0.norm()
    else:  # the first Adam step: m_hat = g, v_hat = g^2
        direction, bias_direction = weight.grad / (weight.grad.abs() + eps) + beta * w0, bias.grad / (bias.grad.abs() + eps)
        curvature = direction.norm() / w0.norm()
    rate = trust / (curvature.item() + curvature_eps)
    assert stats["group0.0"]["rate"] == pytest.approx(rate, rel=1e-6)
    torch.testing.assert_close(bias.detach(), b0 - lr * bias_direction, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weight.detach(), w0 - lr * rate * direction, rtol=1e-6, atol=1e-7)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.ln_gate = nn.Parameter(torch.randn(4, 4))  # 2-D, excluded by its name ("ln_")
        self.frozen = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(self.embed(ids)) @ self.ln_gate + self.frozen)


def _group_layout(groups: list[dict[str, Any]]) -> list[tuple[list[str], float, bool, bool]]:
    return [([name for name, _ in g["params"]], g["weight_decay"], g["weight_decay_mask"], g["adaptation_mask"]) for g in groups]


def test_zero3_placeholder_parameters_keep_their_layers_masks() -> None:
    """Under ZeRO-3's zero.Init every parameter is a ``[0]`` placeholder with the real shape in ``ds_shape``: the
    masks follow the layer's dimensions, not the placeholder's (else no layer would get a rate)."""
    model = _Net()
    expected = _group_layout(param_groups(model, weight_decay=0.1))
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    assert _group_layout(param_groups(model, weight_decay=0.1)) == expected
    optimizer = CBLR(param_groups(model, weight_decay=0.1), lr=0.1)
    assert optimizer._partitioned.layers_of(optimizer.param_groups[0]) == [model.embed.weight, model.dense.weight]


def test_param_groups_split_by_name_with_independent_masks() -> None:
    model = _Net()
    assert _group_layout(param_groups(model, weight_decay=0.1)) == [
        (["embed.weight", "dense.weight"], 0.1, True, True),
        (["ln_gate", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"], 0.0, False, False),
    ]
    groups = param_groups(model, weight_decay=0.1, no_weight_decay=("bias", "LayerNorm", "embed"),
                          no_adaptation=("bias", "LayerNorm"), lr=0.5)
    assert _group_layout(groups) == [
        (["ln_gate", "dense.weight"], 0.1, True, True),
        (["embed.weight"], 0.0, False, True),
        (["dense.bias", "LayerNorm.weight", "LayerNorm.bias"], 0.0, False, False),
    ]
    assert all(group["lr"] == 0.5 for group in groups)

    optimizer = CBLR(groups, lr=0.1, curvature="weight_norm")
    model(torch.arange(6).view(2, 3)).square().sum().backward()
    optimizer.step()
    stats = optimizer.layer_stats()
    assert set(stats) == {"embed.weight", "dense.weight", "ln_gate", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"}
    assert all(stats[name]["rate"] == 1.0 for name in ("dense.bias", "LayerNorm.weight", "LayerNorm.bias"))
    assert all(stats[name]["rate"] != 1.0 for name in ("embed.weight", "dense.weight", "ln_gate"))


def test_create_optimizer_groups_a_model_by_name() -> None:
    optimizer = create_optimizer(_Net(), "lamb", weight_decay=0.1, lr=0.01)
    assert [(group["param_names"], group["weight_decay"], group["lr"]) for group in optimizer.param_groups] == [
        (["embed.weight", "dense.weight"], 0.1, 0.01),
        (["ln_gate", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"], 0.0, 0.01),
    ]


def test_named_parameters_key_the_layer_stats() -> None:
    model = _Net()
    model(torch.arange(6).view(2, 3)).square().sum().backward()
    named = CBLR(model.named_parameters())
    named.step()
    assert list(named.layer_stats()) == ["ln_gate", "embed.weight", "dense.weight", "dense.bias", "LayerNorm.weight",
                                         "LayerNorm.bias"]
    unnamed = CBLR([{"params": [model.embed.weight, model.dense.weight]}, {"params": [model.dense.bias]}])
    unnamed.step()
    assert list(unnamed.layer_stats()) == ["group0.0", "group0.1", "group1.0"]


@pytest.mark.parametrize("name", list_optimizers())
def test_layer_stats_match_hand_computed_norms(name: str, make_regression: Callable[..., Any]) -> None:
    problem = make_regression()
    # The secant: the default secant_denoised needs two backward passes per step, the regression takes one.
    # cblr_adam's median rule is MCLR's (checked with mclr_adam); here its layer secant under CBLR's absolute rule.
    curvature = {"cblr": {"curvature": "secant"},
                 "cblr_adam": {"curvature": "secant", "rate_rule": "inverse_curvature"}}.get(name, {})
    optimizer = create_optimizer(problem.model.named_parameters(), name, **TRAIN_KWARGS[name], weight_decay=0.01, **curvature)
    for _ in range(3):
        before = {n: p.detach().clone() for n, p in problem.model.named_parameters()}
        problem.step(optimizer)
    stats = optimizer.layer_stats()
    for param_name, param in problem.model.named_parameters():
        layer = stats[param_name]
        assert layer["grad_norm"] == pytest.approx(param.grad.norm().item(), rel=1e-6)
        assert layer["update_norm"] == pytest.approx((param.detach() - before[param_name]).norm().item(), rel=1e-4)
        group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
        if param.ndim > 1:
            reference = _reference_curvature(optimizer, stats, problem.model)
            expected = group["trust"] * reference / (layer["curvature"] + group["curvature_eps"])
            assert layer["curvature"] > 0
            assert layer["rate"] == pytest.approx(min(expected, group["max_ratio"]), rel=1e-6)
        else:
            assert layer["rate"] == 1.0
    # The weight-norm curvature of LARS by hand: (|g| + beta |w|) / |w| at the weights before the last step.
    if name == "lars":
        w, g = before["0.weight"], problem.model[0].weight.grad
        expected = (g.norm() + 0.01 * w.norm()) / w.norm()
        assert stats["0.weight"]["curvature"] == pytest.approx(expected.item(), rel=1e-6)


def _reference_curvature(optimizer: CBLR, stats: dict[str, dict[str, float]], model: nn.Module) -> float:
    """MCLR normalizes the rates by the median curvature of the adapted (``ndim > 1``) layers; CBLR does not."""
    if not isinstance(optimizer, MCLR):
        return 1.0
    return torch.tensor([stats[name]["curvature"] for name, p in model.named_parameters() if p.ndim > 1]).median().item()
