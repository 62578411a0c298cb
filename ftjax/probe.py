"""Load a model, run one forward pass on a batch of real text, report shapes.

The quickest check that a checkpoint, its tokenizer and a dataset fit
together: `python -m ftjax.main --config=... --workdir=... --mode=probe`.
"""

import json
import pathlib

import jax
import ml_collections
from absl import logging

from ftjax import config as config_lib
from ftjax import models
from ftjax.data import sources


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Returns (and logs) the shapes of one forward pass and the parameter count."""
  workdir_path = pathlib.Path(workdir)
  workdir_path.mkdir(parents=True, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.save_run_config(workdir_path, config)

  texts = sources.load_split(config.data, config.data.train_split)[:config.training.batch_size]
  texts = texts[config.data.text_column]
  model, params = models.from_pretrained(
      config.model.name_or_path, task=config.model.task, num_labels=config.model.num_labels,
      dtype=config.model.dtype, pooling=config.model.pooling, allow_pickle=config.model.allow_pickle, seed=config.seed)
  tokenizer = models.load_tokenizer(config.model.name_or_path)
  batch = tokenizer(texts, padding=True, truncation=True, max_length=config.data.max_length,
                    return_tensors="np")
  inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
  output = jax.jit(model.apply)(params, **inputs)
  report = {
      "model_type": model.config.model_type,
      "num_params": model.num_params(),
      "input_ids": list(inputs["input_ids"].shape),
      "last_hidden_state": list(output.last_hidden_state.shape),
  }
  if output.logits is not None:
    report["logits"] = list(output.logits.shape)
  for key, value in report.items():
    logging.info("%s: %s", key, value)
  print(json.dumps(report))
  return report
