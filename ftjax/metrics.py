"""Evaluation metrics: loss, accuracy and macro precision / recall / F1 (scikit-learn)."""

import numpy as np


def classification(predictions: np.ndarray, labels: np.ndarray, loss_sum: float,
                   num_labels: int) -> dict[str, float]:
  """Metrics over every evaluated example (padding rows already removed)."""
  # Imported here: scikit-learn takes 1.5 s to import, and every process that
  # imports ftjax.train (each restart, each evaluation) would pay it.
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top
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


def language_model(sums: dict[str, np.ndarray], task_names: tuple[str, ...]) -> dict[str, float]:
  """Token-level loss, perplexity and next-token accuracy over response tokens.

  `sums` are summed over every eval batch: `loss_sum`, `correct`, `weight`
  (response tokens), and per task `task_loss_sum`, `task_tokens`. With more
  than one task, each also gets `<task>/loss` and `<task>/perplexity`.
  """
  tokens = max(float(sums["weight"]), 1.0)
  loss = float(sums["loss_sum"]) / tokens
  out = {"loss": loss, "perplexity": float(np.exp(loss)),
         "accuracy": float(sums["correct"]) / tokens, "num_tokens": int(sums["weight"])}
  if len(task_names) > 1:
    for name, loss_sum, count in zip(task_names, sums["task_loss_sum"], sums["task_tokens"]):
      task_loss = float(loss_sum) / max(float(count), 1.0)
      out[f"{name}/loss"] = task_loss
      out[f"{name}/perplexity"] = float(np.exp(task_loss))
  return out
