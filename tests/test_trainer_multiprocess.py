"""CBLRTrainer in 2-process CPU runs (torchrun, gloo): exact dropping, ramping, the hvp closure across ranks, and the
DeepSpeed paths (what trains is ours, or a clear error). The scenarios are in tests/workers/trainer_worker.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

WORKER = Path(__file__).parent / "workers" / "trainer_worker.py"
ROOT = Path(__file__).parent.parent

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _run(group: str, out: Path, **env: str) -> list[dict[str, Any]]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER), group,
               str(out)]
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-5000:]
    return [json.loads((out / f"{group}-rank{rank}.json").read_text()) for rank in range(2)]


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _run("ddp", tmp_path_factory.mktemp("ddp"))


@pytest.mark.parametrize("scoring", ["with_grad", "no_grad"])
def test_dropping_is_exact_across_ranks_and_accumulation(ddp: list[dict[str, Any]], scoring: str) -> None:
    """Pools {0..3} and {4..7}, split over 2 ranks: the synchronized gradient is the kept-mean gradient."""
    for rank, results in enumerate(ddp):
        result = results["drop"][scoring]
        assert result["micro_batches"] == [[2 * rank, 2 * rank + 1], [4 + 2 * rank, 5 + 2 * rank]]
        assert result["max_gradient_error"] < 1e-6 * result["gradient_norm"]
        assert result["kept_fraction"] == 0.75


def test_ramp_across_ranks(ddp: list[dict[str, Any]]) -> None:
    """Sizes 4, 4, 8, 8, 16 = 2 ranks x 2 micro-batches of 1, 1, 2, 2, 4 samples; 40 samples = 2 epochs of 20."""
    plan = [4, 4, 8, 8, 16]
    batches = [result["ramp"]["micro_batches"] for result in ddp]
    stream = []
    for step, size in enumerate(plan):
        per_rank = [batches[rank][str(step)] for rank in range(2)]
        assert [[len(micro) for micro in micro_batches] for micro_batches in per_rank] == [[size // 4] * 2] * 2
        stream += [index for micro in range(2) for rank in range(2) for index in per_rank[rank][micro]]
    assert sorted(stream[:20]) == list(range(20)) and sorted(stream[20:]) == list(range(20))
    for result in ddp:
        assert result["ramp"]["logged"] == plan
        assert result["ramp"]["parameters_match_rank0"]


def test_hvp_closure_estimates_the_global_batch_curvature(ddp: list[dict[str, Any]]) -> None:
    for result in ddp:
        assert result["hvp"]["compared"] >= 30
        assert result["hvp"]["max_relative_error"] < 1e-4
        assert result["hvp"]["same_on_all_ranks"]


def test_deepspeed_trains_our_optimizer_or_stops(tmp_path: Path) -> None:
    extensions = ROOT / ".torch_extensions"
    results = _run("deepspeed", tmp_path, DS_ACCELERATOR="cpu", TORCH_EXTENSIONS_DIR=str(extensions))
    for result in results:
        deepspeed = result["deepspeed"]
        for scenario in ("zero2", "zero2_offload", "client_instance"):
            assert deepspeed[scenario]["ours"], scenario
            assert deepspeed[scenario]["steps"] == [2] and deepspeed[scenario]["parameters_changed"], scenario
        assert deepspeed["zero2_offload"]["zero_force_ds_cpu_optimizer"] is False
        assert deepspeed["client_instance"]["is_client_instance"]  # not rebuilt from args.optim (transformers#38753)
        assert "set \"zero_force_ds_cpu_optimizer\": false" in deepspeed["forced_cpu_adam"]
        assert "remove the \"optimizer\" section" in deepspeed["optimizer_section"]
        # accelerate#2169: a plain Trainer's optimizer becomes DeepSpeedCPUAdam; the check stops it, naming the flag.
        assert deepspeed["plain_trainer_offload"]["error"].startswith("the optimizer in use is deepspeed.ops.adam.cpu_adam.")
        assert "set \"zero_force_ds_cpu_optimizer\": false" in deepspeed["plain_trainer_offload"]["error"]
        assert deepspeed["plain_trainer_offload_prepared"] == {"ours": True}
