"""The ``"optimizer"`` types of a DeepSpeed config that name hf_cblr optimizers, and which one a Trainer run's config names.

**Type names.** Every registry optimizer (:func:`hf_cblr.list_optimizers`) has one ``"type"``, derived from its
registry name by :func:`deepspeed_type` and listed in :data:`DEEPSPEED_OPTIMIZER_TYPES`: the method's acronym in
capitals, then the base capitalized (``cblr`` -> ``CBLR``, ``mclr_adam`` -> ``MCLRAdam``); a spelling that DeepSpeed
already owns (:data:`DEEPSPEED_OWN_OPTIMIZER_TYPES`: ``LAMB`` is its FusedLamb) gets the ``HfCblr`` prefix
(``lamb`` -> ``HfCblrLAMB``). The types match in any case, as DeepSpeed matches its own. A type that looks like ours
(it starts with ``HfCblr`` or with the acronym of a registry method that DeepSpeed does not own, ignoring case and
all but letters and digits: ``cblr_adam``, ``LARSAdam``) but is none of them raises ``ValueError`` naming the valid
types (:func:`registry_name_of_type`).

**A Trainer run's config.** :func:`trainer_deepspeed_optimizer` reads which of them the DeepSpeed config of a
``TrainingArguments`` run names, before transformers fills its ``"auto"`` values, so that
:class:`~hf_cblr.trainer.CBLRTrainingArguments` can take the learning rate that the registry recommends for the
optimizer that will be built. This module imports nothing of the package but the registry, so the training arguments
can import it (:mod:`hf_cblr.integrations.deepspeed` imports them).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch
from accelerate.utils import str_to_bool
from accelerate.utils.deepspeed import HfDeepSpeedConfig

from hf_cblr.optim.registry import list_optimizers

__all__ = [
    "DEEPSPEED_OPTIMIZER_TYPES",
    "DEEPSPEED_OWN_OPTIMIZER_TYPES",
    "HF_CBLR_TYPE_PREFIX",
    "deepspeed_type",
    "registry_name_of_type",
    "trainer_deepspeed_optimizer",
]

#: DeepSpeed's own ``"optimizer"`` types (``deepspeed.runtime.config.DEEPSPEED_OPTIMIZERS``, which DeepSpeed matches
#: in any case): a registry optimizer whose spelling is one of them gets the :data:`HF_CBLR_TYPE_PREFIX`.
DEEPSPEED_OWN_OPTIMIZER_TYPES = frozenset({"adagrad", "adam", "adamw", "lamb", "lion", "muadam", "muadamw", "muon", "musgd"})
#: The prefix of a type whose plain spelling DeepSpeed owns (``HfCblrLAMB``); also what marks a type as meant for hf_cblr.
HF_CBLR_TYPE_PREFIX = "HfCblr"


def deepspeed_type(name: str) -> str:
    """The DeepSpeed ``"type"`` of registry optimizer ``name``: its method's acronym in capitals, then each further part
    capitalized (``cblr`` -> ``CBLR``, ``mclr_adam`` -> ``MCLRAdam``), with :data:`HF_CBLR_TYPE_PREFIX` where DeepSpeed
    owns that spelling (``lamb`` -> ``HfCblrLAMB``)."""
    method, *rest = name.split("_")
    spelling = method.upper() + "".join(part.capitalize() for part in rest)
    return HF_CBLR_TYPE_PREFIX + spelling if spelling.lower() in DEEPSPEED_OWN_OPTIMIZER_TYPES else spelling


#: The ``"optimizer": {"type": ...}`` names of a DeepSpeed config that this package builds (matched in any case), and
#: their registry names: one per registry optimizer, all of which run under ZeRO-1/2/3.
DEEPSPEED_OPTIMIZER_TYPES = {deepspeed_type(name): name for name in list_optimizers()}
_REGISTRY_NAME_OF_TYPE = {type_name.lower(): name for type_name, name in DEEPSPEED_OPTIMIZER_TYPES.items()}
#: What a type meant for hf_cblr starts with, once lower-cased and stripped of all but letters and digits: the prefix,
#: or a registry method's acronym that DeepSpeed does not own.
_OUR_TYPE_STEMS = (HF_CBLR_TYPE_PREFIX.lower(), *sorted({name.split("_")[0] for name in list_optimizers()}
                                                        - DEEPSPEED_OWN_OPTIMIZER_TYPES))


def registry_name_of_type(type_name: str) -> str | None:
    """The registry name of DeepSpeed ``"type"`` ``type_name``; None for a type that DeepSpeed builds (its own, or a
    ``torch.optim`` class); ``ValueError`` naming the valid types for one that looks like ours but is none of them."""
    name = _REGISTRY_NAME_OF_TYPE.get(type_name.lower())
    if name is not None or type_name.lower() in DEEPSPEED_OWN_OPTIMIZER_TYPES or hasattr(torch.optim, type_name):
        return name
    if re.sub(r"[^a-z0-9]", "", type_name.lower()).startswith(_OUR_TYPE_STEMS):
        raise ValueError(f"the DeepSpeed config's \"optimizer\" type {type_name!r} is not an hf_cblr optimizer; "
                         f"valid types (any case): {sorted(DEEPSPEED_OPTIMIZER_TYPES)}")
    return None


def trainer_deepspeed_optimizer(deepspeed: dict[str, Any] | str | None) -> str | None:
    """The registry name of the hf_cblr optimizer that the ``"optimizer"`` section of a Trainer run's DeepSpeed config
    names; None without a config or a section, or for a section that DeepSpeed builds.

    The config is ``deepspeed``, the value of ``TrainingArguments.deepspeed`` (a dict, a JSON file's path, or JSON or
    base64 text); where that is None, the config of an ``accelerate launch`` with DeepSpeed: the file of its
    ``deepspeed_config_file``, which Accelerate's launcher passes to ``DeepSpeedPlugin`` in the environment
    (``ACCELERATE_USE_DEEPSPEED``, ``ACCELERATE_DEEPSPEED_CONFIG_FILE``), as ``TrainingArguments`` reads it.
    """
    if deepspeed is None and str_to_bool(os.environ.get("ACCELERATE_USE_DEEPSPEED", "false")):
        deepspeed = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not deepspeed:
        return None
    section = HfDeepSpeedConfig(deepspeed).config.get("optimizer")
    return registry_name_of_type(str(section.get("type", ""))) if section else None
