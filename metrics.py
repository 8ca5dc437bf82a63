"""The tasks' metrics, in percent as the paper prints them: accuracy, Matthews correlation and F1 of
the positive class from scikit-learn, Pearson and Spearman correlations from SciPy."""

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def accuracy(labels, predicted):
    return 100.0 * accuracy_score(labels, predicted)


def mcc(labels, predicted):
    return 100.0 * matthews_corrcoef(labels, predicted)


def f1(labels, predicted):
    """F1 of the positive class (1: paraphrase, duplicate), as GLUE reports MRPC and QQP."""
    return 100.0 * f1_score(labels, predicted, zero_division=0.0)


def _correlation(fn, labels, scores):
    """0 where the correlation is undefined (constant scores), as scikit-learn's MCC does."""
    labels, scores = np.asarray(labels, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    if len(labels) < 2 or np.ptp(labels) == 0 or np.ptp(scores) == 0:
        return 0.0
    return 100.0 * float(fn(labels, scores)[0])


def pearson(labels, scores):
    return _correlation(pearsonr, labels, scores)


def spearman(labels, scores):
    return _correlation(spearmanr, labels, scores)


METRICS = {"Accuracy": accuracy, "MCC": mcc, "F1": f1, "Pearson": pearson, "Spearman": spearman}
ON_SCORES = ("Pearson", "Spearman")  # the others compare predicted classes
LOWER_IS_BETTER = ("Perplexity",)
METRIC_KEYS = {"Accuracy": "acc", "MCC": "mcc", "F1": "f1", "Pearson": "pearson", "Spearman": "spearman",
               "Perplexity": "ppl"}  # the log's names: va_acc, tr_f1, va_ppl ...


def is_number(text):
    """Whether a submitted value reads as a score."""
    try:
        float(text)
    except ValueError:
        return False
    return True
