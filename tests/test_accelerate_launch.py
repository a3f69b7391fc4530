"""``accelerate launch --config_file F scripts/finetune.py`` with each shipped Accelerate config (issue 11).

Each file of ``configs/accelerate/`` trains a tiny BERT for a few steps through Accelerate's own launcher (the
command in the file's header), on 2 processes where the file is multi-process (``--num_processes 2`` overrides its
count) and on the CPU: DeepSpeed with ``DS_ACCELERATOR=cpu`` over gloo. The run's ``train_results.json`` must then
show what the file asks for: the number of processes, the ZeRO stage of its DeepSpeed config (none without
DeepSpeed) and our optimizer class (the DeepSpeed configs have no ``optimizer`` block, so ``--optim`` decides); under
FSDP its version, every parameter a DTensor and our optimizer's per-layer sums all-reduced over the shards. A file
that needs GPUs is launched only where CUDA is; ``test_accelerate_configs.py`` validates every file without one. An
FSDP file launched on CPU processes is refused: Accelerate runs FSDP only on accelerators (``docs/sharding.md``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from hf_cblr.data import sentiment_examples
from hf_cblr.optim.registry import get_optimizer_info

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
#: The files that only make sense on GPUs: DDP over the machine's GPUs in bf16, FSDP2 (Accelerate has no FSDP on CPU).
NEEDS_GPU = {"multi_gpu.yaml", "fsdp2_multi_gpu.yaml"}
OPTIM = "mclr_adam"
GLOBAL_BATCH_SIZE = 8
MAX_STEPS = 3
LAUNCHED_PROCESSES = 2


def expected_optimizer_class(name: str) -> str:
    cls = get_optimizer_info(name).optimizer_class
    return f"{cls.__module__}.{cls.__qualname__}"


def expected_zero_stage(accelerate_config: ClusterConfig) -> int | None:
    """The ZeRO stage that the file asks for: that of its DeepSpeed config file, or its own ``zero_stage``; None
    without DeepSpeed. The DeepSpeed config must leave the optimizer to ``--optim`` (no ``optimizer`` block)."""
    if accelerate_config.distributed_type != DistributedType.DEEPSPEED:
        return None
    fields = accelerate_config.deepspeed_config
    if "deepspeed_config_file" not in fields:
        return fields["zero_stage"]
    deepspeed_config = json.loads((ROOT / fields["deepspeed_config_file"]).read_text())
    assert "optimizer" not in deepspeed_config, "the optimizer is --optim's only without an 'optimizer' block"
    return deepspeed_config["zero_optimization"]["stage"]


def launch(config_path: Path, tmp_path: Path, num_processes: int | None, on_gpus: bool) -> dict[str, object]:
    """Train through :func:`run_launch`; return the run's ``train_results.json``."""
    result = run_launch(config_path, tmp_path, num_processes, on_gpus)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == MAX_STEPS
    return json.loads((tmp_path / "out" / "train_results.json").read_text())


def run_launch(config_path: Path, tmp_path: Path, num_processes: int | None,
               on_gpus: bool) -> subprocess.CompletedProcess[str]:
    """Run ``accelerate launch --config_file config_path`` (from the repository root, where the configs' relative
    DeepSpeed paths point) of the script on a tiny BERT, with ``--num_processes num_processes`` unless None, on the CPU
    (GPUs hidden, DeepSpeed's CPU accelerator) unless ``on_gpus``, writing to ``tmp_path / "out"``."""
    train_file = tmp_path / "train.tsv"
    lines = ["sentence\tlabel", *(f"{sentence}\t{label}" for sentence, label in sentiment_examples("train")[:32])]
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    output_dir = tmp_path / "out"
    world_size = num_processes or 1
    override = ["--num_processes", str(num_processes)] if num_processes else []
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path), *override,
               str(SCRIPT), "--tiny_model", "--train_file", str(train_file), "--output_dir", str(output_dir),
               "--optim", OPTIM, "--optim_args", "trust=1.0,sample_size=64", "--learning_rate", "1e-3",
               "--per_device_train_batch_size", str(GLOBAL_BATCH_SIZE // world_size),
               "--batch_size_schedule", f"linear:4,4,{GLOBAL_BATCH_SIZE}", "--drop_fraction", "0.25",
               "--max_steps", str(MAX_STEPS), "--save_strategy", "no", "--probe_interval", "0", "--logging_steps", "1",
               "--disable_tqdm", "true"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "TORCH_EXTENSIONS_DIR": str(ROOT / ".torch_extensions")}
    if not on_gpus:
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_accelerate_launch_trains_as_the_config_says(path: Path, tmp_path: Path) -> None:
    config = load_config_from_file(str(path))
    needs_gpu = path.name in NEEDS_GPU
    if needs_gpu and not torch.cuda.is_available():
        pytest.skip(f"{path.name} runs on GPUs; without CUDA test_accelerate_configs.py only validates it")
    if config.num_processes > 1:
        num_processes = min(LAUNCHED_PROCESSES, torch.cuda.device_count()) if needs_gpu else LAUNCHED_PROCESSES
    else:
        num_processes = None
    zero_stage = expected_zero_stage(config)
    if zero_stage is not None and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed")

    results = launch(path, tmp_path, num_processes, on_gpus=needs_gpu)

    assert results["world_size"] == (num_processes or 1)
    assert results.get("zero_stage") == zero_stage
    assert results["optimizer"] == OPTIM
    assert results["optimizer_class"] == expected_optimizer_class(OPTIM)
    if config.distributed_type == DistributedType.FSDP:  # every parameter a shard; the optimizer summed over the shards
        assert results["fsdp_version"] == config.fsdp_config["fsdp_version"]
        assert results["dtensor_parameters"] == results["parameters"] > 0
        assert results["dtensor_all_reduces"] >= MAX_STEPS
    else:
        assert "fsdp_version" not in results


FSDP_CONFIGS = [path for path in CONFIGS if load_config_from_file(str(path)).distributed_type == DistributedType.FSDP]


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", FSDP_CONFIGS[:1], ids=[path.name for path in FSDP_CONFIGS[:1]])
def test_an_fsdp_config_on_cpu_processes_is_refused(path: Path, tmp_path: Path) -> None:
    """On CPU processes Accelerate drops the FSDP plugin and wraps the model in DDP: the run would not be sharded.
    CBLRTrainer stops it, naming why and what to use on the CPU."""
    result = run_launch(path, tmp_path, LAUNCHED_PROCESSES, on_gpus=False)
    assert result.returncode != 0
    assert "FSDP was requested" in result.stdout + result.stderr
    assert "on CPU processes it drops the FSDP plugin" in result.stdout + result.stderr
