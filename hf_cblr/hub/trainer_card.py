"""The hf_cblr card as the Trainer's own: what ``CBLRTrainer.create_model_card`` writes, and the callback that writes it
before each checkpoint push.

``transformers.Trainer.push_to_hub`` saves the model, calls ``create_model_card`` (which writes ``README.md`` into the
output folder) and uploads the folder in one commit; ``CBLRTrainer`` overrides ``create_model_card`` with
:func:`save_trainer_model_card`, so that commit carries the hf_cblr card. The checkpoint pushes of ``hub_strategy``
(``Trainer._push_from_checkpoint``) upload the output folder without calling ``create_model_card``; their public hook
is ``on_push_begin``, where :class:`ModelCardCallback` writes the card first. The arguments are those of
``Trainer.create_model_card`` (transformers 5.25), read as :class:`~hf_cblr.hub.ModelCardInfo` fields; what they leave
out is read from the trainer (see :func:`trainer_model_card_info`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.utils import is_datasets_available

from hf_cblr.hub.model_card import ModelCardInfo, create_model_card, model_card_info_from_trainer

if TYPE_CHECKING:
    from huggingface_hub import ModelCard
    from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

#: The card's file in the output folder (and the repository).
MODEL_CARD_NAME = "README.md"


def _first(value: str | list[str] | None) -> str | None:
    return value[0] if isinstance(value, list) else value


def _as_list(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def trainer_model_card_info(
    trainer: Trainer,
    language: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    tasks: str | list[str] | None = None,
    dataset_tags: str | list[str] | None = None,
    dataset: str | list[str] | None = None,
    dataset_args: str | list[str] | None = None,
) -> ModelCardInfo:
    """The card of ``trainer`` (:func:`~hf_cblr.hub.model_card_info_from_trainer`) with the arguments of
    ``Trainer.create_model_card``: ``finetuned_from`` is the Hub ``base_model``, ``tasks`` the pipeline task (default
    ``text-classification``), ``dataset`` the dataset's name in the card, ``dataset_tags`` its Hub id and
    ``dataset_args`` its configuration, ``tags`` extra tags. Left out, they are read from the trainer:
    ``model_name`` from ``hub_model_id`` (else the output folder's name); the base model from the model's
    ``config._name_or_path`` (a Hub id, or the local folder it was loaded from; none for a model built from a
    config); the dataset's name from its Hub id, else the training set's ``datasets`` builder (``csv``, ``json``...);
    the evaluated split from the evaluation set; the metrics from the latest evaluation."""
    args = trainer.args
    if model_name is None:
        model_name = args.hub_model_id.split("/")[-1] if args.hub_model_id else Path(args.output_dir).name
    fields: dict[str, Any] = {"language": language, "extra_tags": _as_list(tags)}
    if license is not None:
        fields["license"] = license
    if tasks is not None:
        fields["task"] = _first(tasks)
    source = str(getattr(getattr(trainer.model, "config", None), "_name_or_path", "") or "")
    if finetuned_from is not None:
        fields["base_model"] = finetuned_from
    elif source and Path(source).exists():
        fields["base_model_source"] = source
    elif source:
        fields["base_model"] = source
    dataset_hub_id = _first(dataset_tags)
    train_dataset, eval_dataset = _as_datasets_dataset(trainer.train_dataset), _as_datasets_dataset(trainer.eval_dataset)
    builder = train_dataset.info.builder_name if train_dataset is not None else None
    split = eval_dataset.split if eval_dataset is not None else None
    return model_card_info_from_trainer(
        trainer,
        model_name=model_name,
        dataset_label=", ".join(_as_list(dataset)) or dataset_hub_id or builder or "an unnamed dataset",
        dataset_hub_id=dataset_hub_id,
        dataset_config=_first(dataset_args),
        dataset_type=dataset_hub_id or builder,
        eval_split=str(split) if split else "validation",
        **fields,
    )


def trainer_model_card(trainer: Trainer, **kwargs: Any) -> ModelCard:
    """The rendered card of :func:`trainer_model_card_info` (same arguments)."""
    return create_model_card(trainer_model_card_info(trainer, **kwargs))


def save_trainer_model_card(trainer: Trainer, **kwargs: Any) -> Path | None:
    """Write :func:`trainer_model_card` (same arguments) as ``README.md`` of the output folder, on the main process (as
    ``Trainer.create_model_card``); returns its path there, None elsewhere."""
    if not trainer.is_world_process_zero():
        return None
    path = Path(trainer.args.output_dir) / MODEL_CARD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer_model_card(trainer, **kwargs).save(path)
    return path


class ModelCardCallback(TrainerCallback):
    """Writes ``trainer``'s card into the output folder when a push begins (``on_push_begin``): a ``hub_strategy``
    checkpoint push then uploads it in its commit, as ``push_to_hub`` does with the card of ``create_model_card``."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_push_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.trainer.create_model_card()


def _as_datasets_dataset(dataset: Any) -> Any:
    """``dataset`` when it is a ``datasets.Dataset`` (which knows its builder and split), else None."""
    if not is_datasets_available():
        return None
    import datasets

    return dataset if isinstance(dataset, datasets.Dataset) else None
