"""The shipped Accelerate configs pass Accelerate's own checks (issue 11: ``deepspeed_zero3.yaml`` did not)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[path.name for path in CONFIGS])
def test_accelerate_loads_the_config(path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1


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
