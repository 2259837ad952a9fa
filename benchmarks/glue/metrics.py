"""Official GLUE metrics, computed locally with scikit-learn and scipy (no hub download at evaluation time).

CoLA: Matthews correlation; MRPC, QQP: accuracy and binary F1 (positive class 1); STS-B: Pearson and
Spearman correlation; every other task: accuracy. MNLI's two dev sets are scored separately by the caller
(``matched_accuracy``, ``mismatched_accuracy``).
"""

import math
import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_F1_TASKS = ("mrpc", "qqp")


def predictions_from_logits(task: str, logits: np.ndarray) -> np.ndarray:
    """Class ids from logits ``(N, num_labels)``; for STS-B (``num_labels == 1``) the scores ``(N,)``."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if task == "stsb" else logits.argmax(axis=-1)


def glue_metrics(task: str, predictions, labels) -> dict:
    """Metric name -> value for ``task``; ``predictions`` are class ids (scores for STS-B)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task == "stsb":
        with warnings.catch_warnings():  # constant input: undefined, reported as None below
            warnings.simplefilter("ignore")
            return {"pearson": _finite(pearsonr(predictions, labels)[0]),
                    "spearman": _finite(spearmanr(predictions, labels)[0])}
    if task == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, predictions))}
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if task in _F1_TASKS:
        out["f1"] = float(f1_score(labels, predictions, zero_division=0))
    return out


def _finite(value) -> float | None:
    """Correlation of a constant prediction is undefined: report None (valid JSON) rather than NaN."""
    value = float(value)
    return value if math.isfinite(value) else None
