"""DeepSpeed ZeRO-1/2/3 with 2 ranks gives the parameters and layer rates of a single process without DeepSpeed.

The workers train under ZeRO on 2 CPU ranks (gloo), with layers cut across the partition boundary: with
``deepspeed.initialize`` (``tests/workers/ds_zero_worker.py``) and with ``CBLRTrainer``
(``tests/workers/ds_trainer_worker.py``); the references here run the same steps in this process on the whole batch.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from torch import Tensor
from workers.parity import assert_matches, single_process_run

import hf_cblr
from hf_cblr.integrations import deepspeed as zero

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "ds_zero_worker.py"
TRAINER_WORKER = ROOT / "tests" / "workers" / "ds_trainer_worker.py"
SAVE_AT = 5


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


worker = _load("ds_zero_worker", WORKER)


@cache
def reference(case: str) -> tuple[dict[str, Tensor], dict[str, dict[str, float]], int]:
    """The parameters, layer statistics and optimizer state bytes of a single-process run without DeepSpeed."""
    return single_process_run(worker, case, fused=None)  # the default, which the ranks run on their partitions


def run_worker(ranks: int, *args: str, script: Path = WORKER) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(script),
               *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


ZERO_SETUPS = ["1", "2", "3", "1+round_robin", "2+offload", "3+offload"]


@pytest.fixture(scope="module", params=ZERO_SETUPS, ids=lambda setup: f"zero{setup}")
def zero_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Each case trained under ZeRO stage ``param`` on 2 ranks (with a save and resume at step 5)."""
    output = tmp_path_factory.mktemp(f"zero{request.param.replace('+', '-')}")
    run_worker(2, str(output), request.param, str(SAVE_AT))
    return {case: torch.load(output / f"{case}.pt", weights_only=False) for case in worker.CASES}


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_zero_matches_single_process(zero_run: dict[str, dict[str, Any]], case: str) -> None:
    result = zero_run[case]
    assert "0.weight" in result["split_layers"]  # a layer is cut across the two ranks' partitions
    assert_matches(result, reference(case))


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_zero_state_is_partitioned_and_reduced_per_partition(zero_run: dict[str, dict[str, Any]], case: str) -> None:
    """Each rank holds about half the single-process state (its element-wise part is cut, the per-layer scalars
    are not), and every per-layer sum of a step (norms, inner products, MCLR's samples) goes through one all-reduce
    per partition and step, not one per norm or per layer."""
    result = zero_run[case]
    assert max(result["state_bytes_per_rank"]) < 0.6 * reference(case)[2]
    assert result["reductions_per_step"] == result["partitions"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_zero_resume_continues_the_run(zero_run: dict[str, dict[str, Any]], case: str) -> None:
    """Saved at step 5 and resumed in a new engine: the same parameters as the run that did not stop."""
    result = zero_run[case]
    torch.testing.assert_close(result["resumed"], result["parameters"], rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", ["1", "3"])
def test_resume_at_another_world_size_stops_with_a_clear_error(tmp_path: Path, stage: str) -> None:
    """DeepSpeed re-partitions optimizer state only through universal checkpoints: a 2-rank checkpoint
    loaded on 1 rank stops, naming both world sizes, instead of loading per-layer state cut for 2 ranks."""
    run_worker(2, str(tmp_path), stage, "resize-save")
    run_worker(1, str(tmp_path), stage, "resize-load")
    error = (tmp_path / "resize-error.txt").read_text()
    assert error.startswith("ZeRORuntimeException") and "world size of 2" in error and "world size is 1" in error


@pytest.mark.multiprocess
def test_trainer_with_a_deepspeed_config_matches_single_process(tmp_path: Path) -> None:
    """CBLRTrainer, ZeRO-2 on 2 ranks, the optimizer from the config's "optimizer" section and from ``optim``:
    the parameters and layer rates of a CBLRTrainer without DeepSpeed on the same batches."""
    trainer_worker = _load("ds_trainer_worker", TRAINER_WORKER)
    run_worker(2, str(tmp_path), script=TRAINER_WORKER)
    args = trainer_worker.training_args(str(tmp_path / "reference"), trainer_worker.GLOBAL_BATCH, optim="cblr",
                                        optim_args=f"trust={trainer_worker.TRUST},curvature={trainer_worker.CURVATURE}")
    expected = trainer_worker.train(args)
    for run in trainer_worker.RUNS:
        result = torch.load(tmp_path / f"{run}.pt", weights_only=False)
        assert result["split_layers"], run  # some layer is cut across the two ranks' partitions
        torch.testing.assert_close(result["parameters"], expected["parameters"], rtol=1e-5, atol=1e-6, msg=run)
        assert result["layer_stats"].keys() == expected["layer_stats"].keys()
        for layer, stats in expected["layer_stats"].items():
            if layer.endswith("key.bias"):  # gradient 0 up to rounding (softmax is shift invariant): its secant is noise
                continue
            for key, value in stats.items():
                assert result["layer_stats"][layer][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (run, layer, key)


def test_offload_that_forces_deepspeed_cpu_adam_is_refused() -> None:
    config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "zero_force_ds_cpu_optimizer": True,
              "optimizer": {"type": "CBLR", "params": {"lr": 0.1, "curvature": "secant"}}}
    with pytest.raises(ValueError, match="zero_force_ds_cpu_optimizer"):
        zero.initialize(worker.build_model(), config)


@pytest.mark.multiprocess
def test_mclr_with_adapted_layers_in_several_zero3_sub_groups_stops_with_a_clear_error(tmp_path: Path) -> None:
    """ZeRO-3 steps each sub-group in its own call, where MCLR's median over the adapted layers would see only some."""
    run_worker(1, str(tmp_path), "3", "sub-groups")
    error = (tmp_path / "sub-groups-error.txt").read_text()
    assert "median curvature over all 3 adapted layers" in error and "sub_group_size" in error


@pytest.mark.parametrize("section", [{"type": "MCLR", "params": {"curvature": "hutchinson"}},
                                     {"type": "CBLR", "params": {"curvature": "hvp"}}])
def test_estimators_that_cannot_run_on_partitions_are_refused_at_initialize(section: dict[str, Any]) -> None:
    with pytest.raises(NotImplementedError, match="not supported under DeepSpeed ZeRO"):
        zero.initialize(worker.build_model(), {"zero_optimization": {"stage": 2}, "optimizer": section})


def test_optimizer_from_config_builds_ours_and_leaves_others() -> None:
    model = worker.build_model()
    config: dict[str, Any] = {"optimizer": {"type": "LARS", "params": {"lr": 0.5, "trust_coefficient": 0.02}}}
    optimizer = zero.optimizer_from_config(config, model)
    assert isinstance(optimizer, hf_cblr.LARS)
    assert optimizer.defaults["lr"] == 0.5 and optimizer.defaults["trust"] == 0.02
    assert config == {"zero_allow_untested_optimizer": True}
    adam = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert zero.optimizer_from_config(adam, model) is None
    assert adam == {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}


def test_optimizer_from_config_rejects_unknown_arguments() -> None:
    config = {"optimizer": {"type": "CBLR", "params": {"lr": 0.1, "trust_coeff": 0.1}}}
    with pytest.raises(TypeError, match="trust_coeff"):
        zero.optimizer_from_config(config, worker.build_model())
