"""Accuracy as an ``evaluate`` metric that works offline: load it with ``evaluate.load(path_to_this_file)``.

The same interface as the Hub's ``evaluate-metric/accuracy`` (arguments ``predictions``,
``references``, ``normalize``, ``sample_weight``; result ``{"accuracy": value}``), computed with
numpy instead of scikit-learn:

.. math::  \\text{accuracy} = \\frac{\\sum_i w_i\\, [\\hat y_i = y_i]}{\\sum_i w_i}
    \\quad (w_i = 1 \\text{ without sample weights; the numerator alone when } normalize=False)
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the proportion of correct predictions among all predictions:
Accuracy = (TP + TN) / (TP + TN + FP + FN). A local, offline copy of the interface of
`evaluate-metric/accuracy`, shipped with hf_cblr, computed with numpy.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): ground-truth labels.
    normalize (`bool`): if False, return the number (or total weight) of correct predictions
        instead of their fraction. Defaults to True.
    sample_weight (`list` of `float`): sample weights. Defaults to None (all 1).

Returns:
    accuracy (`float` or `int`): in [0, 1] when normalize=True (1 is best); otherwise the number
        (an int) or the total weight (a float) of correct predictions.

Examples:
    >>> accuracy = evaluate.load("hf_cblr/metrics/accuracy/accuracy.py")
    >>> accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0])
    {'accuracy': 0.5}
"""

_CITATION = """
@article{scikit-learn,
  title={Scikit-learn: Machine Learning in {P}ython},
  author={Pedregosa, F. and Varoquaux, G. and Gramfort, A. and Michel, V. and Thirion, B. and Grisel, O. and
          Blondel, M. and Prettenhofer, P. and Weiss, R. and Dubourg, V. and Vanderplas, J. and Passos, A. and
          Cournapeau, D. and Brucher, M. and Perrot, M. and Duchesnay, E.},
  journal={Journal of Machine Learning Research},
  volume={12},
  pages={2825--2830},
  year={2011}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("int32")),
                    "references": datasets.Sequence(datasets.Value("int32")),
                }
                if self.config_name == "multilabel"
                else {
                    "predictions": datasets.Value("int32"),
                    "references": datasets.Value("int32"),
                }
            ),
            reference_urls=["https://huggingface.co/spaces/evaluate-metric/accuracy"],
        )

    def _compute(self, predictions: list, references: list, normalize: bool = True,
                 sample_weight: list[float] | None = None) -> dict[str, float | int]:
        # multilabel rows count as correct only when every label matches (scikit-learn's subset accuracy)
        correct = np.all(np.asarray(predictions) == np.asarray(references), axis=tuple(range(1, np.ndim(predictions))))
        weights = np.ones(len(correct)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
        total = float(np.sum(weights * correct))
        if not normalize:
            return {"accuracy": int(total) if sample_weight is None else total}
        return {"accuracy": total / float(np.sum(weights))}
