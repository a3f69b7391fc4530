"""Bad input gets a clear error naming the argument and its valid values, at construction, never a wrong run
(issue 10: the cases fixed so far)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hf_cblr import CBLR, create_optimizer, list_optimizers
from hf_cblr.diagnostics import load_probes
from hf_cblr.integrations import deepspeed as hf_deepspeed
from hf_cblr.integrations.transformers import parse_optim_args
from hf_cblr.optim.config import CBLRConfig
from hf_cblr.trainer import CBLRTrainingArguments
from hf_cblr.trainer.batch_schedule import parse_batch_size_schedule


@pytest.mark.parametrize("name", list_optimizers())
def test_complex_parameters_are_refused_at_construction(name: str) -> None:
    """A real cast would erase their imaginary part: refused, naming the parameter's dtype and the fix."""
    with pytest.raises(TypeError, match=r"complex parameters .*complex64.* torch.view_as_real"):
        create_optimizer([nn.Parameter(torch.zeros(2, 2, dtype=torch.complex64))], name)


@pytest.mark.parametrize("seed", ["abc", None, 1.5, True, -1])
def test_seed_must_be_a_non_negative_integer(seed: object) -> None:
    with pytest.raises(TypeError if not isinstance(seed, int) or isinstance(seed, bool) else ValueError,
                       match=r"seed must be an integer >= 0"):
        CBLRConfig(seed=seed)


def test_numpy_scalars_are_accepted_as_numbers() -> None:
    optimizer = CBLR([nn.Parameter(torch.zeros(2, 2))], lr=np.float32(0.25), trust=np.float64(0.5),
                     update_interval=np.int64(1), seed=np.int64(3))
    assert optimizer.param_groups[0]["lr"] == 0.25 and optimizer.param_groups[0]["trust"] == 0.5
    assert optimizer.estimator.seed == 3


def test_a_nan_in_optim_args_names_its_key() -> None:
    with pytest.raises(ValueError, match=r"optim_args trust=nan: the value is NaN"):
        parse_optim_args("curvature=secant,trust=nan")


def test_a_huge_list_schedule_is_refused_at_parse_time() -> None:
    with pytest.raises(ValueError, match=r"lists 10000000001 steps; at most 1000000"):
        parse_batch_size_schedule("list:8*10000000000,16")


def test_negative_weight_decay_fails_at_argument_time(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"weight_decay must be in \[0.0, inf\), got -1.0"):
        CBLRTrainingArguments(output_dir=str(tmp_path), optim="cblr", weight_decay=-1.0, use_cpu=True, report_to=[])


@pytest.mark.parametrize("other", ["sgd", "adamw"])
def test_another_optimizers_state_is_refused_at_load(other: str) -> None:
    """torch's SGD or AdamW state loads into a CBLR only to fail at its first step: refused at load, saying so."""
    param = nn.Parameter(torch.ones(2, 2))
    foreign = torch.optim.SGD([param], lr=0.1, momentum=0.9) if other == "sgd" else torch.optim.AdamW([param])
    param.grad = torch.ones(2, 2)
    foreign.step()
    optimizer = CBLR([param], lr=0.1)
    source = "torch's SGD with momentum" if other == "sgd" else "torch's Adam/AdamW"
    with pytest.raises(ValueError, match=rf"was not saved by an hf_cblr optimizer .*those of {source}.*start the optimizer"):
        optimizer.load_state_dict(foreign.state_dict())


def test_fd_with_a_non_finite_gradient_keeps_the_previous_estimates() -> None:
    """A non-finite gradient anywhere makes the finite-difference probe meaningless: every layer keeps its estimate
    (as with ``hvp``), none becomes its weight decay."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    inputs, targets = torch.randn(16, 4), torch.randn(16, 2)

    def closure() -> torch.Tensor:
        return nn.functional.mse_loss(model(inputs), targets)

    optimizer = CBLR(model.named_parameters(), lr=0.01, curvature="fd", weight_decay=0.01, foreach=False)
    for _ in range(2):
        optimizer.zero_grad()
        closure().backward()
        optimizer.step(closure)
    before = {name: layer["curvature"] for name, layer in optimizer.layer_stats().items()}
    optimizer.zero_grad()
    closure().backward()
    model[0].weight.grad[0, 0] = float("nan")
    optimizer.step(closure)
    after = {name: layer["curvature"] for name, layer in optimizer.layer_stats().items()}
    adapted = [name for name, value in before.items() if value > 0]
    assert adapted and all(after[name] == before[name] for name in adapted), (before, after)


@pytest.mark.parametrize("curvature", ["hvp", "hutchinson"])
def test_a_loss_linear_in_the_parameters_has_zero_hessian_not_an_attention_error(curvature: str) -> None:
    """The gradient of a linear loss has no graph: ``H v = 0`` (the curvature is the weight decay), not an error
    that blames fused attention kernels."""
    param = nn.Parameter(torch.ones(3, 3))
    inputs = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))

    def closure() -> torch.Tensor:
        return (param * inputs).sum()

    optimizer = CBLR([param], lr=0.1, curvature=curvature, weight_decay=0.5, sample_size=None)
    closure().backward()
    optimizer.step(closure)
    assert optimizer.layer_stats()["group0.0"]["curvature"] == pytest.approx(0.5)


@pytest.mark.parametrize(("name", "scheduler_class"), [(name, cls) for name in list_optimizers()
                                                       for cls in ("OneCycleLR", "CyclicLR")])
def test_momentum_schedulers_cycle_the_momentum_the_step_reads(name: str, scheduler_class: str) -> None:
    """torch cycles ``betas[0]`` wherever a group has ``betas``: only the Adam bases carry them, so the SGD bases
    get their ``momentum`` cycled, the Adam bases their ``betas[0]``."""
    param = nn.Parameter(torch.ones(4, 4))
    optimizer = create_optimizer([param], name, lr=0.01)
    if scheduler_class == "OneCycleLR":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10, base_momentum=0.8,
                                                        max_momentum=0.95)
    else:
        scheduler = torch.optim.lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=2,
                                                      base_momentum=0.8, max_momentum=0.95)
    read = (lambda: optimizer.param_groups[0]["betas"][0]) if optimizer.base == "adam" else (
        lambda: optimizer.param_groups[0]["momentum"])
    values = set()
    for _ in range(4):
        param.grad = torch.ones(4, 4)
        optimizer.step()
        scheduler.step()
        values.add(round(read(), 6))
    assert len(values) > 1, values
    assert ("betas" in optimizer.param_groups[0]) == (optimizer.base == "adam")


def test_a_cut_probe_file_is_named_in_the_error(tmp_path: Path) -> None:
    path = tmp_path / "structure_probes.jsonl"
    path.write_text('{"step": 1, "layers": {}}\n{"step": 2, "lay', encoding="utf-8")
    with pytest.raises(ValueError, match=r"structure_probes.jsonl, line 2: not a JSON record"):
        load_probes(path)


def test_a_broken_deepspeed_config_file_is_named_in_the_error(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2', encoding="utf-8")
    with pytest.raises(ValueError, match=r"ds.json' is not valid JSON"):
        hf_deepspeed.initialize(nn.Linear(2, 2), path)


@pytest.mark.parametrize("change", [
    {"drop_fraction": 0.25},
    {"drop_scoring": "no_grad"},
    {"batch_size_lr_scaling": "none"},
    {"batch_size_schedule": None, "batch_size_lr_scaling": "none", "max_steps": 6},
])
def test_resume_refuses_changed_run_settings_even_when_the_consumed_samples_match(tmp_path: Path,
                                                                                  change: dict[str, object]) -> None:
    """A changed ramp or dropping setting that leaves the consumed-sample count unchanged still changes the run."""
    from workers.tiny import IndexedDataset, tiny_bert

    from hf_cblr.trainer import CBLRTrainer

    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], disable_tqdm=True, optim="cblr", learning_rate=0.01,
                per_device_train_batch_size=8, batch_size_schedule="list:8", batch_size_lr_scaling="linear",
                drop_fraction=0.125, num_train_epochs=2, save_strategy="steps", save_steps=2, max_grad_norm=0.0)
    CBLRTrainer(model=tiny_bert(), args=CBLRTrainingArguments(**{**base, "max_steps": 2}),
                train_dataset=IndexedDataset(24)).train()
    trainer = CBLRTrainer(model=tiny_bert(), args=CBLRTrainingArguments(**{**base, **change}),
                          train_dataset=IndexedDataset(24))
    name = next(iter(change))
    with pytest.raises(ValueError, match=rf"settings that shape the run's steps changed: .*{name}="):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


@pytest.mark.parametrize(("params", "match"), [
    (None, r"has \"params\": None; give a JSON object of lars's arguments"),
    ("lr=0.1", r"has \"params\": 'lr=0.1'; give a JSON object"),
    ({"lr": "auto"}, r"\['lr'\] are \"auto\", which only the Hugging Face Trainer fills in"),
])
def test_a_bad_deepspeed_optimizer_section_names_the_fix(params: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        hf_deepspeed.optimizer_from_config({"optimizer": {"type": "LARS", "params": params}}, nn.Linear(2, 2))


def test_float64_parameters_step_in_float64() -> None:
    """State and arithmetic stay in fp64: LARS matches its formula to fp64 precision, and an update below fp32's
    resolution of the weights is not lost."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(6, 5, dtype=torch.float64, generator=generator) + 10.0
    grad = torch.randn(6, 5, dtype=torch.float64, generator=generator) * 1e-3
    param = nn.Parameter(weights.clone())
    lr, trust, decay = 1e-4, 1e-3, 0.01
    optimizer = create_optimizer([param], "lars", lr=lr, trust_coefficient=trust, weight_decay=decay, momentum=0.0)
    param.grad = grad.clone()
    optimizer.step()
    rate = trust / ((grad.norm() + decay * weights.norm()) / weights.norm() + 1e-8)  # curvature_eps 1e-8
    expected = weights - lr * rate * (grad + decay * weights)
    assert param.dtype == torch.float64
    torch.testing.assert_close(param.detach(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("name", list_optimizers())
def test_every_optimizer_keeps_float64_state(name: str) -> None:
    param = nn.Parameter(torch.ones(4, 4, dtype=torch.float64))
    optimizer = create_optimizer([param], name, lr=1e-12, **({"curvature": "secant"} if name.startswith("cblr") else {}))
    for step in range(3):
        param.grad = torch.full((4, 4), 1.0 + step, dtype=torch.float64)
        optimizer.step()
    floating = [v for v in optimizer.state[param].values() if isinstance(v, torch.Tensor) and v.numel() > 1]
    assert floating and all(v.dtype == torch.float64 for v in floating)
    assert (param.detach() != 1.0).all()  # steps of ~1e-12 survive in fp64 (they vanish in fp32)
