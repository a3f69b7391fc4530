"""CBLRTrainingArguments and the plain-Trainer helpers: optimizer names and arguments, validation at argument time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from workers.tiny import IndexedDataset, tiny_bert

from hf_cblr import LAMB, MCLR, list_optimizers
from hf_cblr.integrations import (
    OptimizerCheckCallback,
    check_optimizer_in_use,
    find_optimizer,
    optimizer_cls_and_kwargs,
    parse_optim_args,
    prepare_deepspeed_config,
)
from hf_cblr.trainer import CBLRTrainer, CBLRTrainingArguments


def _args(tmp_path: Path, **kwargs: Any) -> CBLRTrainingArguments:
    return CBLRTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **kwargs)


def test_mclr_with_optim_args_builds_our_optimizer(tmp_path: Path) -> None:
    args = _args(tmp_path, optim="mclr", optim_args="trust=0.5, curvature=hutchinson, update_interval=3, max_ratio=inf",
                 learning_rate=0.02, weight_decay=0.01)
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset())
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is MCLR
    assert optimizer.curvature == "hutchinson" and optimizer.update_interval == 3
    groups = {(group["weight_decay_mask"], group["adaptation_mask"]): group for group in optimizer.param_groups}
    assert set(groups) == {(True, True), (False, False)}
    for group in optimizer.param_groups:
        assert group["trust"] == 0.5 and group["lr"] == 0.02 and group["max_ratio"] == float("inf")
    decayed, plain = groups[True, True], groups[False, False]
    assert decayed["weight_decay"] == 0.01 and plain["weight_decay"] == 0.0
    assert "bert.encoder.layer.0.attention.self.query.weight" in decayed["param_names"]
    assert {"bert.encoder.layer.0.attention.self.query.bias", "bert.embeddings.LayerNorm.weight"} <= set(plain["param_names"])
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(trainer.model.parameters()))


@pytest.mark.parametrize("name", list_optimizers())
def test_every_registry_name_is_accepted(tmp_path: Path, name: str) -> None:
    args = _args(tmp_path, optim=name, learning_rate=0.01, adam_beta2=0.98)
    optimizer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset()).create_optimizer()
    assert find_optimizer(optimizer) is optimizer
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.01
    # Only the Adam base reads betas, so only its groups carry them (torch's momentum schedulers cycle betas[0]).
    assert group["betas"][1] == 0.98 if optimizer.base == "adam" else "betas" not in group


def test_lamb_takes_its_own_argument_names(tmp_path: Path) -> None:
    args = _args(tmp_path, optim="lamb", optim_args="trust_coefficient=0.5,betas=0.8:0.9")
    optimizer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset()).create_optimizer()
    assert type(optimizer) is LAMB and optimizer.param_groups[0]["trust"] == 0.5
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.9)


def test_stock_optimizers_still_work(tmp_path: Path) -> None:
    args = _args(tmp_path, optim="adamw_torch", optim_args=None)
    assert args.optim == "adamw_torch"
    optimizer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset()).create_optimizer()
    assert type(optimizer) is torch.optim.AdamW


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optim": "clbr"},
     r"optim='clbr' is not valid; valid values: \['cblr', 'cblr_adam', 'lamb', 'lars', 'mclr', 'mclr_adam', 'adamw_"),
    ({"optim": "mclr", "optim_args": "trsut=0.5"}, r"does not take argument\(s\) \['trsut'\]; valid arguments: \[.*'trust'"),
    ({"optim": "mclr", "optim_args": "trust=-1"}, r"trust must be in \(0.0, inf\)"),
    ({"optim": "mclr", "optim_args": "curvature=secant"}, "MCLR needs per-element curvatures"),
    ({"optim": "lars", "optim_args": "trust"}, "'trust' is not of the form key=value"),
    ({"optim": "cblr", "optim_args": "trust=0.1,trust=0.2"}, "gives 'trust' twice"),
    ({"optim": "cblr", "optim_args": "lr=0.1"}, "use the training argument learning_rate"),
    ({"optim": "cblr", "optim_args": "weight_decay=0.1"}, "use the training argument weight_decay"),
    ({"batch_size_schedule": "linear:8,8"}, "START,INCREMENT,RAMP_SAMPLES"),
    ({"batch_size_schedule": "steps:8"}, r"kinds: \['linear', 'milestones', 'list'\]"),
    ({"batch_size_lr_scaling": "cubic"}, r"batch_size_lr_scaling='cubic' is not valid; valid values: \['none', 'linear'"),
    ({"batch_size_lr_scaling": "sqrt"}, "needs a batch_size_schedule"),
    ({"drop_fraction": 1.0}, r"drop_fraction must be a number in \[0, 1\)"),
    ({"drop_fraction_end": -0.1}, r"drop_fraction_end must be a number in \[0, 1\)"),
    ({"drop_warmup_steps": -1}, "drop_warmup_steps must be an integer >= 0"),
    ({"drop_selection": "random"}, r"drop_selection='random' is not valid; valid values: \['topk', 'sampled'\]"),
    ({"drop_scoring": "eval"}, r"drop_scoring='eval' is not valid; valid values: \['with_grad', 'no_grad'\]"),
])
def test_bad_values_fail_at_argument_time(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **kwargs)


def test_command_line_parsing(tmp_path: Path) -> None:
    (args,) = HfArgumentParser(CBLRTrainingArguments).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--optim", "cblr_adam", "--optim_args", "curvature=hvp,update_interval=4",
        "--batch_size_schedule", "milestones:0=8,100=16", "--batch_size_lr_scaling", "sqrt", "--drop_fraction", "0.2",
        "--drop_selection", "sampled", "--drop_scoring", "no_grad", "--use_cpu", "--report_to", "none",
    ])
    assert args.optim == "cblr_adam" and args.optimizer_kwargs()["curvature"] == "hvp"
    assert args.batch_size_schedule == "milestones:0=8,100=16" and args.drop_fraction == 0.2
    assert args.drop_selection == "sampled" and args.drop_scoring == "no_grad"
    with pytest.raises(SystemExit):
        HfArgumentParser(CBLRTrainingArguments).parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--optim", "nope"])


def test_parse_optim_args_types() -> None:
    parsed = parse_optim_args(" a=true, b=False,c=none, d=10_000, e=-3, f=1e-3, g=inf, h=0.9:0.999, i=hvp, j=1:x ")
    assert parsed == {"a": True, "b": False, "c": None, "d": 10000, "e": -3, "f": 1e-3, "g": float("inf"),
                      "h": (0.9, 0.999), "i": "hvp", "j": (1, "x")}
    assert isinstance(parsed["d"], int) and isinstance(parsed["f"], float)
    assert parse_optim_args(None) == {} and parse_optim_args("  ") == {}
    with pytest.raises(ValueError, match="NaN"):
        parse_optim_args("trust=nan")
    with pytest.raises(ValueError, match="'=3' is not of the form key=value"):
        parse_optim_args("=3")


def test_plain_trainer_gets_our_optimizer_from_the_helper(tmp_path: Path) -> None:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=0.03, weight_decay=0.01,
                             adam_beta1=0.8)
    pair = optimizer_cls_and_kwargs("mclr_adam", "trust=0.5,curvature=hutchinson", training_args=args)
    trainer = Trainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(), optimizer_cls_and_kwargs=pair)
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is MCLR and optimizer.base == "adam" and optimizer.curvature == "hutchinson"
    group = optimizer.param_groups[0]
    assert group["lr"] == 0.03 and group["trust"] == 0.5 and group["betas"] == (0.8, 0.999)
    assert sorted(group["weight_decay"] for group in optimizer.param_groups) == [0.0, 0.01]
    assert check_optimizer_in_use(optimizer) is optimizer
    assert optimizer_cls_and_kwargs("lars", {"lr": 2.0})[1]["lr"] == 2.0
    with pytest.raises(ValueError, match=r"optimizer name 'sgdd' is not registered; valid values: \['cblr'"):
        optimizer_cls_and_kwargs("sgdd")
    with pytest.raises(ValueError, match=r"does not take argument\(s\) \['momentum'\]"):
        optimizer_cls_and_kwargs("lamb", "momentum=0.9")


def test_optimizer_check_sees_through_wrappers_and_names_the_offload_flag() -> None:
    param = torch.nn.Parameter(torch.zeros(2, 2))
    ours = MCLR([param])

    class Wrapper:  # the shape of AcceleratedOptimizer / DeepSpeedZeroOptimizer: the wrapped one in .optimizer
        def __init__(self, optimizer: Any) -> None:
            self.optimizer = optimizer

    assert find_optimizer(Wrapper(Wrapper(ours))) is ours
    with pytest.raises(RuntimeError, match=r"torch\.optim\.adamw\.AdamW, not CBLR"):
        OptimizerCheckCallback().on_train_begin(None, None, None, optimizer=Wrapper(torch.optim.AdamW([param])))
    DeepSpeedCPUAdam = type("DeepSpeedCPUAdam", (), {})  # stands in for deepspeed.ops.adam's class
    with pytest.raises(RuntimeError, match="\"zero_force_ds_cpu_optimizer\": false"):
        check_optimizer_in_use(Wrapper(DeepSpeedCPUAdam()))


def test_prepare_deepspeed_config() -> None:
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert prepare_deepspeed_config(offload)["zero_force_ds_cpu_optimizer"] is False
    plain = {"zero_optimization": {"stage": 2}}
    assert "zero_force_ds_cpu_optimizer" not in prepare_deepspeed_config(plain)
    with pytest.raises(ValueError, match="set \"zero_force_ds_cpu_optimizer\": false"):
        prepare_deepspeed_config({**offload, "zero_force_ds_cpu_optimizer": True})
    with pytest.raises(ValueError, match="remove the \"optimizer\" section"):
        prepare_deepspeed_config({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 1}})


@pytest.mark.parametrize(("optim", "expected"), [("cblr_adam", 5e-4), ("mclr_adam", 5e-4), ("lamb", 5e-3),
                                                 ("adamw_torch", 5e-5)])
def test_without_a_learning_rate_the_registry_recommendation_is_used(tmp_path: Path, optim: str, expected: float) -> None:
    """Issue 11: no silent 5e-5 x trust for our optimizers; stock optimizers keep transformers' default."""
    args = CBLRTrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to=[])
    assert args.learning_rate == expected
    if optim != "adamw_torch":
        assert args.optimizer_kwargs()["lr"] == expected


@pytest.mark.parametrize("optim", ["cblr", "mclr", "lars"])
def test_an_optimizer_without_a_recommended_learning_rate_asks_for_one(tmp_path: Path, optim: str) -> None:
    with pytest.raises(ValueError, match=rf"optim='{optim}' has no recommended learning rate .*give learning_rate"):
        CBLRTrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to=[])
    assert CBLRTrainingArguments(output_dir=str(tmp_path), optim=optim, learning_rate=0.1, use_cpu=True,
                                 report_to=[]).learning_rate == 0.1


def test_a_reporting_run_logs_the_layer_rates_and_curvatures(tmp_path: Path) -> None:
    """With ``report_to`` set, CBLRTrainer attaches LayerStatsCallback first (before the reporting integrations), so the
    training logs carry ``layer_rate/<layer>`` and ``layer_curvature/<layer>``; without, it is not attached."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra")
    from hf_cblr.diagnostics import LayerStatsCallback

    quiet = CBLRTrainer(model=tiny_bert(), args=_args(tmp_path / "quiet", optim="mclr_adam"))
    assert not any(isinstance(callback, LayerStatsCallback) for callback in quiet.callback_handler.callbacks)
    args = CBLRTrainingArguments(output_dir=str(tmp_path / "reported"), use_cpu=True, report_to="tensorboard",
                                 optim="mclr_adam", max_steps=2, logging_steps=1, per_device_train_batch_size=4,
                                 save_strategy="no", disable_tqdm=True)
    trainer = CBLRTrainer(model=tiny_bert(), args=args, train_dataset=IndexedDataset(8))
    assert isinstance(trainer.callback_handler.callbacks[0], LayerStatsCallback)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert all(f"layer_rate/{name}" in entry and f"layer_curvature/{name}" in entry for entry in logged)
