"""Evaluation metrics: loss, accuracy and macro precision / recall / F1 (scikit-learn)."""

import numpy as np
from sklearn import metrics as skm


def classification(predictions: np.ndarray, labels: np.ndarray, loss_sum: float,
                   num_labels: int) -> dict[str, float]:
  """Metrics over every evaluated example (padding rows already removed)."""
  precision, recall, f1, _ = skm.precision_recall_fscore_support(
      labels, predictions, labels=np.arange(num_labels), average="macro", zero_division=0)
  return {
      "loss": float(loss_sum / max(len(labels), 1)),
      "accuracy": float(skm.accuracy_score(labels, predictions)),
      "precision": float(precision),
      "recall": float(recall),
      "f1": float(f1),
      "num_examples": int(len(labels)),
  }
