"""Model cards and Hub publishing for runs of this package's Trainer.

The card is always written to the output folder (``README.md``); :func:`push_to_hub_with_card`
pushes the folder and then this card, replacing the draft that ``Trainer.push_to_hub`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from hf_cblr.hub.model_card import (
    DEFAULT_TEMPLATE,
    METHOD_URL,
    PACKAGE_URL,
    ModelCardInfo,
    create_model_card,
    model_card_info_from_trainer,
    optimizer_class_name,
    optimizer_hyperparameters,
)

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from transformers import Trainer

__all__ = [
    "DEFAULT_TEMPLATE",
    "METHOD_URL",
    "PACKAGE_URL",
    "ModelCardInfo",
    "create_model_card",
    "model_card_info_from_trainer",
    "optimizer_class_name",
    "optimizer_hyperparameters",
    "push_to_hub_with_card",
]


def push_to_hub_with_card(trainer: Trainer, card: ModelCard, commit_message: str = "End of training") -> str | None:
    """Push ``trainer``'s output folder to ``args.hub_model_id``, then ``card`` as its ``README.md``.

    ``Trainer.push_to_hub`` (call on every process: it saves the model) writes its own draft card
    into the output folder and uploads it; this writes ``card`` back over the draft and pushes it as
    a second commit. Returns the card commit's URL on the main process, None elsewhere.
    """
    trainer.push_to_hub(commit_message=commit_message)
    if not trainer.is_world_process_zero():
        return None
    card.save(Path(trainer.args.output_dir) / "README.md")
    return card.push_to_hub(trainer.hub_model_id, token=trainer.args.hub_token,
                            commit_message="Model card (hf_cblr)", revision=trainer.args.hub_revision)
