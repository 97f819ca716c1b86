"""GLUE's metrics (Wang et al. 2019, section 3), over a whole evaluation split.

  accuracy  mean(prediction == label)
  f1        2 TP / (2 TP + FP + FN), class 1 positive (MRPC, QQP)
  matthews  (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))  (CoLA)
  pearson   cov(prediction, label) / (std(prediction) std(label))    (STS-B)
  spearman  pearson of the ranks (ties get their mean rank)          (STS-B)
computed with scikit-learn and SciPy, as GLUE's own scripts do. A correlation that is
undefined (a constant prediction) is 0, as scikit-learn makes Matthews' then.
"""
from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics


def _defined(value: float) -> float:
  return float(value) if np.isfinite(value) else 0.0


def _correlation(fn):
  def correlation(prediction, label):
    if np.ptp(prediction) == 0 or np.ptp(label) == 0:
      return 0.0
    return _defined(fn(prediction, label)[0])
  return correlation


METRICS = {
    'accuracy': lambda prediction, label: float(np.mean(prediction == label)),
    'f1': lambda prediction, label: float(metrics.f1_score(label, prediction, zero_division=0)),
    'matthews': lambda prediction, label: float(metrics.matthews_corrcoef(label, prediction)),
    'pearson': _correlation(stats.pearsonr),
    'spearman': _correlation(stats.spearmanr),
}
