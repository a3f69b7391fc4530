"""Metrics that work offline, as ``evaluate`` modules loaded by path (see :func:`load_metric`).

``evaluate.load("accuracy")`` fetches its script from the Hugging Face Hub (or its cache). Where
that fails (no network, nothing cached) the fine-tuning script loads the module of the same name
in this folder, e.g. ``accuracy/accuracy.py``: the same inputs, arguments and result key as the
Hub's ``evaluate-metric/accuracy``, computed with numpy instead of scikit-learn.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import evaluate

logger = logging.getLogger(__name__)

METRICS_DIR = Path(__file__).resolve().parent


def local_metric_path(name: str) -> Path:
    """The script of the local metric ``name``, e.g. ``.../hf_cblr/metrics/accuracy/accuracy.py``."""
    path = METRICS_DIR / name / f"{name}.py"
    if not path.is_file():
        available = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"there is no local metric {name!r}; local metrics: {available}")
    return path


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """``evaluate.load(name, **kwargs)`` where it works (network or cache), otherwise the local module ``name``."""
    import evaluate

    try:
        metric = evaluate.load(name, **kwargs)
    except Exception as error:  # evaluate raises FileNotFoundError, ConnectionError, OSError... offline
        path = local_metric_path(name)
        logger.info("evaluate.load(%r) is not available (%s: %s); using the local metric %s",
                    name, type(error).__name__, error, path)
        return evaluate.load(str(path), **kwargs)
    logger.info("metric %r loaded by evaluate from the Hub or its cache", name)
    return metric
