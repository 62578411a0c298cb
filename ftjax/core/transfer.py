"""`init_from`: start a run from another run's fine-tuned weights (intermediate-task transfer)."""

import jax
from absl import logging

from ftjax import checkpoint as checkpoint_lib
from ftjax import models
from ftjax.errors import CheckpointError, FtjaxError
from ftjax.models import keymap
from ftjax.peft import partition


def init_from(source: str, model: models.Model,
              params) -> tuple[dict, list[str], list[str]]:
  """Copies another run's fine-tuned (trainable) weights over `params`.

  The source is a workdir (its latest checkpoint) or a checkpoint folder.
  Leaves it does not hold (its frozen base, when it was a LoRA or freeze run)
  keep this run's base-model values; a head of another shape (another number
  of labels) keeps its fresh initialisation; the source objective's own
  parameters are not model weights and are skipped. Returns the params, the
  paths restored and the paths re-initialised; logs one line saying what came
  from where.
  """
  try:
    workdir, step = checkpoint_lib.find(source)
  except FileNotFoundError as e:
    raise FtjaxError(f"init_from={source!r}: no checkpoint at {e}; expected a training "
                     f"workdir or <workdir>/checkpoints/<step>") from None
  saved = checkpoint_lib.read_trainable(workdir, step)
  flat = keymap.flatten(params)
  restored, reinitialised, skipped = [], [], []
  for path, value in saved.items():
    if path not in flat:
      skipped.append(path)
    elif tuple(value.shape) == tuple(flat[path].shape):
      flat[path] = jax.device_put(value.astype(flat[path].dtype), flat[path].sharding)
      restored.append(path)
    elif path.startswith(partition.HEAD_PREFIXES):
      reinitialised.append(f"{path} {tuple(value.shape)}->{tuple(flat[path].shape)}")
    else:
      raise CheckpointError(
          f"init_from={source!r}: parameter {path!r} has shape {tuple(value.shape)} there but "
          f"{tuple(flat[path].shape)} in this model; is it another architecture?")
  if not restored:
    raise CheckpointError(f"init_from={source!r}: none of its {len(saved)} parameters fit this "
                          f"model; is it another architecture?")
  logging.info("init_from %s (step %d): restored %d parameters; re-initialised: %s; not in "
               "this model: %s", workdir, step, len(restored), ", ".join(reinitialised) or "none",
               ", ".join(skipped) or "none")
  return (keymap.unflatten(flat, model.abstract_params), restored,
          [r.split(" ")[0] for r in reinitialised])
