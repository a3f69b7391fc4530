"""Model cards and Hub publishing for runs of this package's Trainer.

``CBLRTrainer.create_model_card`` writes the hf_cblr card (:func:`save_trainer_model_card`) into the output folder,
so that ``trainer.push_to_hub()`` uploads it with the model in one commit, and :class:`ModelCardCallback` writes it
before each ``hub_strategy`` checkpoint push. :func:`create_model_card` renders any :class:`ModelCardInfo` from the
template that ships in the package (``hf_cblr/hub/template.md``).
"""

from hf_cblr.hub.model_card import (
    METHOD_URL,
    PACKAGE_URL,
    TEMPLATE_RESOURCE,
    ModelCardInfo,
    create_model_card,
    default_template,
    latest_evaluation,
    model_card_info_from_trainer,
    optimizer_class_name,
    optimizer_hyperparameters,
    run_precision,
)
from hf_cblr.hub.trainer_card import (
    MODEL_CARD_NAME,
    ModelCardCallback,
    save_trainer_model_card,
    trainer_model_card,
    trainer_model_card_info,
)

__all__ = [
    "METHOD_URL",
    "MODEL_CARD_NAME",
    "PACKAGE_URL",
    "TEMPLATE_RESOURCE",
    "ModelCardCallback",
    "ModelCardInfo",
    "create_model_card",
    "default_template",
    "latest_evaluation",
    "model_card_info_from_trainer",
    "optimizer_class_name",
    "optimizer_hyperparameters",
    "run_precision",
    "save_trainer_model_card",
    "trainer_model_card",
    "trainer_model_card_info",
]
