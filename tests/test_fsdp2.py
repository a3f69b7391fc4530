"""PyTorch FSDP2 (``fully_shard``) with 2 ranks gives the parameters and layer rates of a single process.

The worker (``tests/workers/fsdp2_worker.py``) trains a tiny MLP whose layers' first dimensions (37, 9, 1) do not
divide by the world size, one of them smaller than it, with every optimizer case, on 2 CPU ranks (gloo); the
references here run the same steps in this process on the whole batch. The single-process tests use a 1-rank mesh.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from workers.parity import assert_matches, single_process_run

import hf_cblr
from hf_cblr.optim.dtensor_layers import check_dtensor_support

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "fsdp2_worker.py"

spec = importlib.util.spec_from_file_location("fsdp2_worker", WORKER)
assert spec is not None and spec.loader is not None
worker = importlib.util.module_from_spec(spec)
spec.loader.exec_module(worker)


@cache
def reference(case: str) -> tuple[dict[str, Tensor], dict[str, dict[str, float]], int]:
    """The parameters, layer statistics and optimizer state bytes of a single-process run without FSDP."""
    return single_process_run(worker, case)


@pytest.fixture(scope="module")
def fsdp2_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Every case trained under FSDP2 on 2 ranks, with a DCP save at step 5 and a resume on 2 ranks and on 1."""
    output = tmp_path_factory.mktemp("fsdp2")
    run_worker(2, output)
    run_worker(1, output, "resize")
    return {case: {**torch.load(output / f"{case}.pt", weights_only=False),
                   "resized": torch.load(output / f"resized-{case}.pt", weights_only=False)["resumed"]}
            for case in worker.CASES}


def run_worker(ranks: int, output: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), str(WORKER),
               str(output), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_matches_single_process(fsdp2_run: dict[str, dict[str, Any]], case: str) -> None:
    result = fsdp2_run[case]
    assert_matches(result, reference(case))


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_state_is_sharded_and_reduced_per_batch(fsdp2_run: dict[str, dict[str, Any]], case: str) -> None:
    """Each rank holds about half the single-process state (element-wise state is sharded; per-layer scalars and
    sample rows are not, so with whole-layer samples MCLR's state falls less), and every per-layer sum of a step (the
    norms of the direction, the estimator's and the update's, MCLR's samples) goes through one all-reduce per param
    group and step, a vector of the group's layers, not one per norm, per layer or per operator."""
    result = fsdp2_run[case]
    # MCLR with sample_size=None keeps every element of every layer as its sample row, whole on every rank
    whole_rows = "sample_size" in worker.CASES[case][1] and worker.CASES[case][1]["sample_size"] is None
    assert max(result["state_bytes_per_rank"]) < (0.9 if whole_rows else 0.65) * reference(case)[2]
    assert result["reductions_per_step"] == result["param_groups"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_dcp_resume_continues_the_run(fsdp2_run: dict[str, dict[str, Any]], case: str) -> None:
    """Saved through torch distributed checkpoint at step 5 and resumed in a new model and optimizer: the same
    parameters as the run that did not stop."""
    torch.testing.assert_close(fsdp2_run[case]["resumed"], fsdp2_run[case]["parameters"], rtol=0, atol=0)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_resume_through_torch_state_dict_helpers_continues_the_run(fsdp2_run: dict[str, dict[str, Any]],
                                                                         case: str) -> None:
    """Saved and resumed through ``get_state_dict``/``set_state_dict``, which keep only the optimizer's ``state`` and
    ``param_groups`` (keyed by parameter name) and step a fresh optimizer with zero gradients to create the state to
    load into: the settings travel in the param groups, and the run continues bit-identically."""
    torch.testing.assert_close(fsdp2_run[case]["resumed_through_helpers"], fsdp2_run[case]["parameters"], rtol=0, atol=0)


# -- one process: a 1-rank mesh ------------------------------------------------------------------
@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A 1-rank gloo process group in this process and its 1-D device mesh."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = tmp_path_factory.mktemp("store") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 4, mesh: Any = None) -> None:
    """``steps`` steps on the worker's batches (as replicated DTensors on ``mesh`` when given)."""
    for step in range(steps):
        inputs, targets = worker.batch(step)
        if mesh is not None:
            inputs, targets = (distribute_tensor(tensor, mesh, [Replicate()]) for tensor in (inputs, targets))
        optimizer.zero_grad()
        worker.loss_fn(model(inputs), targets).backward()
        optimizer.step()


@pytest.mark.parametrize("case", ["cblr_adam-secant", "mclr-secant_elementwise-50", "lars"])
def test_one_rank_fsdp2_matches_plain_parameters(mesh: Any, case: str) -> None:
    """On one rank every layer is one whole shard: the DTensor source gives the plain step's parameters, and keeps
    element state as DTensors placed as their parameter, per-layer scalars as plain tensors."""
    name, kwargs = worker.CASES[case]
    model = worker.sharded(mesh)
    optimizer = hf_cblr.create_optimizer(model, name, **kwargs)
    _train(model, optimizer)
    plain = worker.build_model()
    # on the foreach kernels, as the DTensor source (the fused kernels, the default on whole CPU layers, round otherwise)
    reference_optimizer = hf_cblr.create_optimizer(plain, name, fused=False, **kwargs)
    _train(plain, reference_optimizer)
    torch.testing.assert_close({n: p.full_tensor() for n, p in model.named_parameters()}, dict(plain.named_parameters()),
                               rtol=1e-6, atol=1e-7)
    assert optimizer.layer_stats().keys() == reference_optimizer.layer_stats().keys()
    for param in model.parameters():
        state = optimizer.state[param]
        assert isinstance(state["step"], Tensor) and not isinstance(state["step"], DTensor)
        element = [value for key, value in state.items() if optimizer.state_schema[key].value == "element"]
        assert element and all(isinstance(value, DTensor) and value.placements == param.placements for value in element)


def test_replicated_dtensor_layers_are_stepped_whole(mesh: Any) -> None:
    """Parameters placed Replicate() (a 1-D mesh): whole layers on every rank, the plain step's parameters."""
    model = worker.build_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            for key, param in list(layer.named_parameters()):
                setattr(layer, key, nn.Parameter(distribute_tensor(param.detach(), mesh, [Replicate()])))
    optimizer = hf_cblr.create_optimizer(model, "cblr", curvature="secant", lr=0.05)
    _train(model, optimizer, mesh=mesh)
    plain = worker.build_model()
    _train(plain, hf_cblr.create_optimizer(plain, "cblr", curvature="secant", lr=0.05))
    torch.testing.assert_close({n: p.full_tensor() for n, p in model.named_parameters()}, dict(plain.named_parameters()),
                               rtol=1e-6, atol=1e-7)
    assert optimizer.dtensor_layers.distributor is not None and optimizer.dtensor_layers.distributor.calls == 0


def _saved_through_helpers(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def _load_through_helpers(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def test_settings_are_checked_through_torch_state_dict_helpers(mesh: Any, tmp_path: Path) -> None:
    """``get_optimizer_state_dict`` keeps the settings (they are in every param group); a resume through
    ``set_optimizer_state_dict`` into an optimizer with other settings, or of torch AdamW's state, is refused (before
    the settings moved into the param groups, the helpers dropped them and every such load was refused as foreign)."""
    name, kwargs = worker.CASES["mclr-secant_elementwise-50"]
    model = worker.sharded(mesh)
    optimizer = hf_cblr.create_optimizer(model, name, **kwargs)
    _train(model, optimizer, steps=2)
    assert all(group["hf_cblr"]["seed"] == 0 for group in get_optimizer_state_dict(model, optimizer)["param_groups"])
    _saved_through_helpers(model, optimizer, tmp_path / "mclr")
    other_seed = worker.sharded(mesh)
    with pytest.raises(ValueError, match=r"saved with \{'seed': 0\}, this MCLR has \{'seed': 1\}"):
        _load_through_helpers(other_seed, hf_cblr.create_optimizer(other_seed, name, **{**kwargs, "seed": 1}), tmp_path / "mclr")

    adamw_model = worker.sharded(mesh)
    adamw = torch.optim.AdamW(adamw_model.parameters())
    _train(adamw_model, adamw, steps=1)
    adamw_state = get_optimizer_state_dict(adamw_model, adamw)  # (DCP would refuse it first: its entries differ)
    model = worker.sharded(mesh)
    with pytest.raises(ValueError, match=r"not saved by an hf_cblr optimizer .*those of torch's Adam/AdamW"):
        set_optimizer_state_dict(model, hf_cblr.create_optimizer(model, name, **kwargs), adamw_state)


@pytest.mark.parametrize("curvature", ["secant_denoised", "secant_pooled", "hvp", "fd", "hutchinson"])
def test_estimators_that_cannot_run_on_shards_are_refused_at_construction(mesh: Any, curvature: str) -> None:
    with pytest.raises(NotImplementedError, match=f"curvature='{curvature}' is not supported under FSDP2"):
        hf_cblr.create_optimizer(worker.sharded(mesh), "cblr", curvature=curvature)


def test_other_placements_are_refused_naming_what_is_supported(mesh: Any) -> None:
    """Tensor parallel's Shard(1) (a column split) cuts a layer into pieces its per-row shards cannot describe."""
    column_split = nn.Parameter(distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)]))
    with pytest.raises(NotImplementedError, match=r"Shard\(0\) \(FSDP2\) or Replicate\(\).*got placements \(Shard\(dim=1\),\)"):
        hf_cblr.CBLR([column_split], curvature="secant")


def test_fsdp1_flat_parameters_are_refused_naming_fsdp2() -> None:
    """FSDP1 marks its flat parameters (and their views under use_orig_params) with ``_fsdp_flattened``; it needs an
    accelerator, so the parameter is marked here by FSDP1's own function."""
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    flat = nn.Parameter(torch.randn(30))
    _set_fsdp_flattened(flat)
    for name in ("cblr", "lamb"):
        with pytest.raises(NotImplementedError, match=r"does not support FSDP1 .*fully_shard"):
            hf_cblr.create_optimizer([flat], name)


def test_check_accepts_plain_and_fsdp2_parameters(mesh: Any) -> None:
    estimator = hf_cblr.create_optimizer(worker.build_model(), "mclr").estimator
    check_dtensor_support(list(worker.sharded(mesh).parameters()), estimator, "MCLR")
    check_dtensor_support(list(worker.build_model().parameters()), estimator, "MCLR")


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(worker.CASES))
def test_fsdp2_dcp_checkpoint_resumes_at_another_world_size(fsdp2_run: dict[str, dict[str, Any]], case: str) -> None:
    """The 2-rank checkpoint resumed on 1 rank: DCP reshards the element state (DTensors); the per-layer scalars and
    sample rows are whole on every rank. The run continues as on 2 ranks, to the rounding of the gradient average."""
    torch.testing.assert_close(fsdp2_run[case]["resized"], fsdp2_run[case]["parameters"], rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_trainer_fsdp_arguments_on_cpu_processes_are_refused(tmp_path: Path) -> None:
    """``fsdp="full_shard"`` with ``fsdp_config={"fsdp_version": 2}`` on 2 CPU processes: Accelerate has no FSDP on the
    CPU and would train unsharded under DDP (``docs/sharding.md``); CBLRTrainer stops the run, saying so."""
    from hf_cblr.data import sentiment_examples

    train_file, fsdp_config = tmp_path / "train.tsv", tmp_path / "fsdp.json"
    lines = ["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in sentiment_examples("train")[:16])]
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fsdp_config.write_text('{"fsdp_version": 2}')
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "scripts" / "finetune.py"), "--tiny_model", "--train_file", str(train_file), "--output_dir",
               str(tmp_path / "out"), "--optim", "mclr_adam", "--learning_rate", "1e-3", "--max_steps", "2",
               "--fsdp", "full_shard", "--fsdp_config", str(fsdp_config), "--save_strategy", "no", "--probe_interval", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "FSDP was requested" in result.stderr and "on CPU processes it drops the FSDP plugin" in result.stderr
    assert not (tmp_path / "out" / "train_results.json").exists()
