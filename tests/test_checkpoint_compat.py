"""Checkpoints saved by the release before the core redesign load into today's code and continue identically.

The fixture (``tests/fixtures/checkpoints_v0.pt``, written by ``tests/fixtures/make_checkpoints.py`` at the commit it
records) holds, per registry optimizer, the model and optimizer state after 3 steps and the parameters after 2 more.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.make_checkpoints import FIXTURE, STEPS_AFTER_SAVE, STEPS_BEFORE_SAVE, build, train_step

from hf_cblr.optim import list_optimizers

CHECKPOINTS = torch.load(FIXTURE, weights_only=False)["checkpoints"]
#: The settings whose defaults changed since the fixture was saved: a resume names them, as a user's would. ``fused``:
#: the default runs the fused kernels on the CPU since, which round differently (to 1e-6 relative); the fixture was
#: saved on the foreach kernels, which continue it bit for bit.
V0_DEFAULTS = {name: {"fused": False} for name in CHECKPOINTS} | {
    "cblr_adam": {"curvature": "secant_denoised", "aggregate": "mean", "rate_rule": "inverse_curvature", "fused": False}}


def test_the_fixture_covers_every_registry_optimizer() -> None:
    assert sorted(CHECKPOINTS) == list_optimizers()


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_a_saved_checkpoint_continues_bit_exactly(name: str) -> None:
    saved = CHECKPOINTS[name]
    model, optimizer = build(name, **V0_DEFAULTS.get(name, {}))
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    for step in range(STEPS_BEFORE_SAVE, STEPS_BEFORE_SAVE + STEPS_AFTER_SAVE):
        train_step(model, optimizer, step)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved["after"][key], rtol=0, atol=0, msg=f"{name}: {key}")


def test_a_checkpoint_saved_under_the_old_defaults_is_refused_under_the_new() -> None:
    """``cblr_adam``'s defaults changed (the median of element-wise secants under the median rule): resuming its v0
    checkpoint with the new defaults stops, naming the setting, instead of continuing another optimizer's state."""
    _, optimizer = build("cblr_adam")
    with pytest.raises(ValueError, match=r"saved with \{'curvature': 'secant_denoised'"):
        optimizer.load_state_dict(CHECKPOINTS["cblr_adam"]["optimizer"])
    _, optimizer = build("cblr_adam", curvature="secant_denoised", aggregate="mean")  # the old estimator, new (median) rule
    with pytest.raises(ValueError, match=r"saved with \{'rate_rule': 'inverse_curvature'\}"):
        optimizer.load_state_dict(CHECKPOINTS["cblr_adam"]["optimizer"])
