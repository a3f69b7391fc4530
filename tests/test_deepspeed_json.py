"""Every registry optimizer can be named in a DeepSpeed JSON ``"optimizer"`` section.

The ``"type"`` names (one per registry optimizer, any case, ``HfCblrLAMB`` for ours where DeepSpeed owns ``LAMB``),
the errors for names that look like ours and are not, the ``"auto"`` params that ``CBLRTrainer``'s training arguments
fill as they fill DeepSpeed's own optimizers', and ZeRO-2 from the shipped ``configs/deepspeed/zero2_mclr_adam.json``
through ``CBLRTrainer`` on 2 CPU ranks (``tests/workers/ds_trainer_worker.py``).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import hf_cblr
from hf_cblr.integrations import deepspeed as hf_deepspeed
from hf_cblr.trainer import CBLRTrainingArguments

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
TRAINER_WORKER = ROOT / "tests" / "workers" / "ds_trainer_worker.py"
MCLR_ADAM_JSON = ROOT / "configs" / "deepspeed" / "zero2_mclr_adam.json"
AUTO_PARAMS = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


# -- the type names -----------------------------------------------------------------------------------
def test_every_registry_optimizer_has_one_type_in_deepspeed_spelling() -> None:
    assert hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES == {
        "CBLR": "cblr", "CBLRAdam": "cblr_adam", "HfCblrLAMB": "lamb", "LARS": "lars", "MCLR": "mclr", "MCLRAdam": "mclr_adam"}
    assert sorted(hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES.values()) == hf_cblr.list_optimizers()


def test_our_types_leave_deepspeeds_own_and_torch_optim_to_deepspeed() -> None:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    assert set(DEEPSPEED_OPTIMIZERS) == hf_deepspeed.DEEPSPEED_OWN_OPTIMIZER_TYPES
    for type_name in hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES:
        assert type_name.lower() not in DEEPSPEED_OPTIMIZERS and not hasattr(torch.optim, type_name), type_name


@pytest.mark.parametrize("type_name", sorted(hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES))
@pytest.mark.parametrize("case", [str, str.lower, str.upper], ids=["as_listed", "lower", "upper"])
def test_each_type_in_any_case_builds_its_registry_optimizer(type_name: str, case: Any) -> None:
    info = hf_cblr.get_optimizer_info(hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES[type_name])
    config: dict[str, Any] = {"optimizer": {"type": case(type_name), "params": {"lr": 0.01}}}
    optimizer = hf_deepspeed.optimizer_from_config(config, _model())
    assert type(optimizer) is info.optimizer_class and optimizer.base == info.base
    assert optimizer.defaults["lr"] == 0.01
    assert config == {"zero_allow_untested_optimizer": True}


def test_lamb_is_deepspeeds_and_hfcblrlamb_is_ours() -> None:
    config: dict[str, Any] = {"optimizer": {"type": "LAMB", "params": {"lr": 1e-3}}}
    assert hf_deepspeed.pop_optimizer_section(config) is None
    assert config == {"optimizer": {"type": "LAMB", "params": {"lr": 1e-3}}}
    ours = hf_deepspeed.optimizer_from_config({"optimizer": {"type": "HfCblrLAMB", "params": {"lr": 1e-3}}}, _model())
    assert type(ours) is hf_cblr.LAMB


@pytest.mark.parametrize("type_name", ["cblr_adam", "CBLR-Adam", "LARSAdam", "MCLRSGD", "HfCblrAdamW", "HfCblrCBLR"])
def test_a_type_that_looks_like_ours_but_is_not_names_the_valid_types(type_name: str) -> None:
    config = {"optimizer": {"type": type_name, "params": {"lr": 0.1}}}
    with pytest.raises(ValueError, match=r"not an hf_cblr optimizer; valid types \(any case\): \['CBLR', 'CBLRAdam', "
                                         r"'HfCblrLAMB', 'LARS', 'MCLR', 'MCLRAdam'\]"):
        hf_deepspeed.pop_optimizer_section(config)
    assert "optimizer" in config


@pytest.mark.parametrize("type_name", ["AdamW", "adam", "Lion", "SGD", "Adagrad", "lambada"])
def test_other_types_are_left_to_deepspeed(type_name: str) -> None:
    config = {"optimizer": {"type": type_name, "params": {"lr": 0.1}}}
    assert hf_deepspeed.pop_optimizer_section(config) is None
    assert config == {"optimizer": {"type": type_name, "params": {"lr": 0.1}}}


def test_base_as_a_param_is_refused_naming_the_types() -> None:
    with pytest.raises(ValueError, match=r"sets \"base\".*part of the type \(\['CBLR', 'CBLRAdam'"):
        hf_deepspeed.pop_optimizer_section({"optimizer": {"type": "CBLR", "params": {"lr": 0.1, "base": "adam"}}})


# -- "auto" params under CBLRTrainer's training arguments ---------------------------------------------
@pytest.fixture
def trainer_deepspeed_args() -> Iterator[Any]:
    """Build ``CBLRTrainingArguments`` with a DeepSpeed config (transformers fills its "auto" values on the way), then
    forget the global DeepSpeed config that building them registers, so that no later test sees it."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    def build(section: dict[str, Any], **kwargs: Any) -> CBLRTrainingArguments:
        config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "optimizer": section}
        return CBLRTrainingArguments(output_dir="unused", use_cpu=True, report_to=[], deepspeed=config, **kwargs)

    yield build
    unset_hf_deepspeed_config()


def _take(args: CBLRTrainingArguments) -> tuple[str, dict[str, Any]] | None:
    return hf_deepspeed.take_trainer_optimizer_section(args, args.hf_deepspeed_config.config, optimizer_given=False)


@pytest.mark.parametrize("type_name", ["CBLRAdam", "MCLRAdam", "HfCblrLAMB"])
def test_auto_params_of_an_adam_base_are_filled_from_the_training_arguments(trainer_deepspeed_args: Any,
                                                                            type_name: str) -> None:
    args = trainer_deepspeed_args({"type": type_name, "params": AUTO_PARAMS}, learning_rate=3e-4, adam_beta1=0.8,
                                  adam_beta2=0.99, adam_epsilon=1e-7, weight_decay=0.02)
    name, kwargs = _take(args)
    assert name == hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES[type_name]
    assert kwargs == {"lr": 3e-4, "betas": [0.8, 0.99], "eps": 1e-7}  # weight_decay goes to the decayed param group
    info = hf_cblr.get_optimizer_info(name)
    optimizer = info.optimizer_class(_model().parameters(), **info.arguments(**kwargs))
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (0.8, 0.99) and optimizer.defaults["eps"] == 1e-7


@pytest.mark.parametrize("type_name", ["CBLR", "MCLR", "LARS"])
def test_auto_params_of_an_sgd_base_are_filled_from_the_training_arguments(trainer_deepspeed_args: Any,
                                                                           type_name: str) -> None:
    args = trainer_deepspeed_args({"type": type_name, "params": {"lr": "auto", "weight_decay": "auto", "momentum": 0.8}},
                                  learning_rate=0.2, weight_decay=0.02)
    assert _take(args) == (hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES[type_name], {"lr": 0.2, "momentum": 0.8})


def test_auto_in_a_param_no_training_argument_fills_is_refused(trainer_deepspeed_args: Any) -> None:
    args = trainer_deepspeed_args({"type": "MCLRAdam", "params": {**AUTO_PARAMS, "trust": "auto"}}, learning_rate=3e-4)
    with pytest.raises(ValueError, match=r"params \['trust'\] are \"auto\", which no training argument fills"):
        _take(args)


def test_a_param_that_differs_from_the_training_argument_is_refused_as_for_deepspeeds_own(trainer_deepspeed_args: Any) -> None:
    """transformers' mismatch check (run when training starts) still sees the section that CBLRTrainer took out."""
    args = trainer_deepspeed_args({"type": "MCLRAdam", "params": {"lr": 0.1}}, learning_rate=3e-4)
    assert _take(args)[1]["lr"] == 0.1
    with pytest.raises(ValueError, match=r"ds optimizer.params.lr=0.1 vs hf learning_rate=0.0003"):
        args.hf_deepspeed_config.trainer_config_finalize(args, _model(), num_training_steps=1)


def test_deepspeeds_lamb_with_optim_lamb_names_the_type_to_write(trainer_deepspeed_args: Any) -> None:
    args = trainer_deepspeed_args({"type": "LAMB", "params": {"lr": "auto"}}, optim="lamb")
    with pytest.raises(ValueError, match=r"'LAMB' is DeepSpeed's own, not hf_cblr's optim='lamb': write \"type\": 'HfCblrLAMB'"):
        _take(args)


def test_the_shipped_json_names_mclr_adam_with_auto_params(trainer_deepspeed_args: Any) -> None:
    section = json.loads(MCLR_ADAM_JSON.read_text())["optimizer"]
    assert section == {"type": "MCLRAdam", "params": AUTO_PARAMS}
    args = trainer_deepspeed_args(copy.deepcopy(section), learning_rate=3e-4)
    assert _take(args) == ("mclr_adam", {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8})


# -- the learning rate without learning_rate: the section's optimizer's recommendation ---------------------
@pytest.mark.parametrize(("type_name", "expected"), [("MCLRAdam", 5e-4), ("CBLRAdam", 5e-4), ("HfCblrLAMB", 5e-3)])
def test_without_learning_rate_an_auto_lr_is_the_sections_recommendation(trainer_deepspeed_args: Any, type_name: str,
                                                                          expected: float) -> None:
    """optim left at the stock default (whose default lr is 5e-5): the lr is that of the optimizer the section builds."""
    args = trainer_deepspeed_args({"type": type_name, "params": dict(AUTO_PARAMS)})
    assert args.learning_rate == expected
    name, kwargs = _take(args)
    assert name == hf_deepspeed.DEEPSPEED_OPTIMIZER_TYPES[type_name] and kwargs["lr"] == expected


def test_without_learning_rate_a_section_without_a_recommendation_asks_for_one(trainer_deepspeed_args: Any) -> None:
    with pytest.raises(ValueError, match=r"the DeepSpeed config's \"optimizer\" type 'CBLR' \(cblr\) has no recommended "
                                         r"learning rate .*give learning_rate"):
        trainer_deepspeed_args({"type": "CBLR", "params": {"lr": "auto"}})
    assert trainer_deepspeed_args({"type": "CBLR", "params": {"lr": "auto"}}, learning_rate=0.1).learning_rate == 0.1


def test_under_accelerate_launch_the_lr_follows_the_config_files_section(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          trainer_deepspeed_args: Any) -> None:
    """``accelerate launch`` with a DeepSpeed config file: ``args.deepspeed`` is None, the file comes through the
    environment; the optimizer that CBLRTrainer builds from its ``HfCblrLAMB`` section has lamb's recommended lr.
    (``trainer_deepspeed_args``: only to forget the global DeepSpeed config afterwards.)"""
    from transformers import BertConfig, BertForSequenceClassification

    from hf_cblr.trainer import CBLRTrainer

    config_file = tmp_path / "ds.json"
    config_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto",
                                       "optimizer": {"type": "HfCblrLAMB", "params": {"lr": "auto", "weight_decay": "auto"}}}))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(config_file))
    args = CBLRTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[])
    assert args.deepspeed is None and args.deepspeed_plugin is not None
    assert args.learning_rate == 5e-3
    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16))
    trainer = CBLRTrainer(model=model, args=args)
    assert trainer.is_deepspeed_enabled and trainer.optimizer_name == "lamb"
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is hf_cblr.LAMB and optimizer.defaults["lr"] == 5e-3


# -- ZeRO-2 from the shipped JSON on 2 ranks -----------------------------------------------------------
def _load_trainer_worker() -> Any:
    spec = importlib.util.spec_from_file_location("ds_trainer_worker", TRAINER_WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_from_the_mclr_adam_json_trains_mclr_adam_as_one_process(tmp_path: Path) -> None:
    """CBLRTrainer, ZeRO-2 on 2 CPU ranks, ``optim`` left at the stock default and the optimizer from the JSON's
    ``MCLRAdam`` section: MCLR on the Adam base with the training arguments' lr/betas/eps, and the parameters of
    ``optim="mclr_adam"`` without DeepSpeed on the same batches."""
    worker = _load_trainer_worker()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(TRAINER_WORKER),
               str(tmp_path), str(MCLR_ADAM_JSON)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    result = torch.load(tmp_path / "json.pt", weights_only=False)
    arguments = worker.JSON_RUN_ARGUMENTS
    assert result["trained"] == {
        "class": "MCLR", "base": "adam", "name": "mclr_adam", "lr": arguments["learning_rate"],
        "betas": (arguments["adam_beta1"], arguments["adam_beta2"]), "eps": arguments["adam_epsilon"],
        "weight_decays": [0.0, 0.01], "steps": worker.STEPS, "zero_stage": 2}
    assert result["split_layers"]  # some layer is cut across the two ranks' partitions
    initial = dict(worker.tiny_bert().named_parameters())
    assert all(not torch.equal(result["parameters"][name], initial[name]) for name in ("classifier.weight",
                                                                                         "bert.pooler.dense.weight"))
    expected = worker.train(worker.training_args(str(tmp_path / "reference"), worker.GLOBAL_BATCH, optim="mclr_adam",
                                                 **arguments))
    torch.testing.assert_close(result["parameters"], expected["parameters"], rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_accelerate_launch_zero3_with_batch_sizes_as_numbers(tmp_path: Path) -> None:
    """``accelerate launch`` of ``scripts/finetune.py`` with ZeRO-3 on 2 CPU ranks from a JSON whose batch sizes are
    numbers, not ``"auto"``: DeepSpeed checks them against the world size when the model is built under ``zero.Init``,
    so its communication must be up by then (the script initializes it whenever DeepSpeed is on, not only for
    ``--deepspeed``); the card names the ZeRO stage the run used (``args.deepspeed`` is None under the launcher)."""
    import yaml
    from test_accelerate_launch import GLOBAL_BATCH_SIZE, LAUNCHED_PROCESSES, launch

    deepspeed_config = json.loads((ROOT / "configs" / "deepspeed" / "zero3.json").read_text())
    deepspeed_config |= {"train_batch_size": GLOBAL_BATCH_SIZE, "gradient_accumulation_steps": 1,
                         "train_micro_batch_size_per_gpu": GLOBAL_BATCH_SIZE // LAUNCHED_PROCESSES}
    (tmp_path / "zero3.json").write_text(json.dumps(deepspeed_config))
    accelerate_config = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml").read_text())
    accelerate_config["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "zero3.json")
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(accelerate_config))

    results = launch(tmp_path / "zero3.yaml", tmp_path, LAUNCHED_PROCESSES, on_gpus=False)

    assert results["world_size"] == LAUNCHED_PROCESSES and results["zero_stage"] == 3
    assert "| `deepspeed` | ZeRO-3 |" in (tmp_path / "out" / "README.md").read_text()
