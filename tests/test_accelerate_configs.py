"""The shipped Accelerate configs pass Accelerate's own checks (issue 11: ``deepspeed_zero3.yaml`` did not), without
launching anything; ``test_accelerate_launch.py`` trains through each of them (the GPU-only ones where CUDA is)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_accelerate_loads_the_config(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import PrecisionType

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    # None: not set, as in the DeepSpeed files, whose JSON's "auto" bf16/fp16 follow the Trainer's arguments
    assert config.mixed_precision in {None, *(precision.value for precision in PrecisionType)}


MULTI_GPU_CONFIGS = [path for path in CONFIGS if yaml.safe_load(path.read_text())["distributed_type"] == "MULTI_GPU"]


@pytest.mark.parametrize("path", MULTI_GPU_CONFIGS, ids=[path.name for path in MULTI_GPU_CONFIGS])
def test_a_multi_gpu_config_passes_accelerate_launchs_checks(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch --config_file F`` validates F's arguments and builds the environment of its DDP (torchrun)
    launch: the file's process count and mixed precision. It needs no GPU, so ``multi_gpu.yaml`` is checked as far as
    it can be without one."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    monkeypatch.chdir(ROOT)
    file = yaml.safe_load(path.read_text())
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(path), "scripts/finetune.py"]))
    environment = prepare_multi_gpu_env(args)
    assert args.multi_gpu and not args.use_deepspeed
    assert args.num_processes == file["num_processes"] >= 2
    assert environment["ACCELERATE_MIXED_PRECISION"] == file["mixed_precision"]


@pytest.mark.parametrize("path", [p for p in CONFIGS if "deepspeed_config_file" in p.read_text()], ids=lambda p: p.name)
def test_a_deepspeed_config_file_passes_accelerates_checks(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``accelerate launch`` exports the config's DeepSpeed fields, and the plugin refuses those that a
    ``deepspeed_config_file`` makes ignored (``DeepSpeedPlugin._deepspeed_config_checks``)."""
    pytest.importorskip("deepspeed")
    from accelerate.utils import DeepSpeedPlugin

    fields = yaml.safe_load(path.read_text())["deepspeed_config"]
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields))
    plugin = DeepSpeedPlugin(hf_ds_config=fields["deepspeed_config_file"], zero3_init_flag=fields.get("zero3_init_flag"))
    assert plugin.zero_stage == int(path.stem[-1])
