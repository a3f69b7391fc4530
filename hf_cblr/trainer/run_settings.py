"""The arguments that shape a ``CBLRTrainer`` run's steps, saved in its checkpoints and checked on resume.

A resumed run replays the stock Trainer's data skip and continues the saved optimizer state; it is the same run only
if the batch-size plan, the micro-batch layout and the dropping are the ones it was saved with. A changed
``batch_size_schedule`` is caught by the consumed-sample check of
:class:`~hf_cblr.trainer.batch_ramp.BatchScheduleCallback` when the counts differ; :class:`RunSettingsCallback`
catches every change, counts equal or not, and refuses it, naming each argument with its saved and current values
(a resume is expected to continue the run, not to start another from its weights: for that, load the model from the
checkpoint and start a new run).
"""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

#: The training arguments that shape the steps of a run (with the world size).
RUN_SHAPING_ARGUMENTS = (
    "batch_size_schedule", "batch_size_lr_scaling", "per_device_train_batch_size", "gradient_accumulation_steps",
    "train_sampling_strategy", "drop_fraction", "drop_fraction_end", "drop_warmup_steps", "drop_selection",
    "drop_scoring",
)


def run_settings(args: TrainingArguments) -> dict[str, Any]:
    """The values of :data:`RUN_SHAPING_ARGUMENTS` and the world size."""
    settings = {name: getattr(args, name) for name in RUN_SHAPING_ARGUMENTS}
    settings["world_size"] = args.world_size
    return settings


class RunSettingsCallback(TrainerCallback, ExportableState):
    """Saves :func:`run_settings` in every checkpoint; on resume, refuses settings other than the saved ones."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"settings": self.settings}}

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.settings = run_settings(args)
        saved = (state.stateful_callbacks or {}).get(type(self).__name__, {})
        saved = saved.get("attributes", {}).get("settings") if isinstance(saved, dict) else None
        if not state.global_step or saved is None:
            return  # a fresh run, or a checkpoint written before the settings were saved
        changed = {name: (saved.get(name), value) for name, value in self.settings.items() if saved.get(name) != value}
        if changed:
            listed = ", ".join(f"{name}={old!r} in the checkpoint, {new!r} now" for name, (old, new) in changed.items())
            raise ValueError(
                f"resuming at step {state.global_step} with settings that shape the run's steps changed: {listed}. "
                "Resume with the checkpoint's values; to train on from its weights with other settings, load the model "
                "from the checkpoint and start a new run"
            )
