"""Export a run's checkpoint for deployment: `python -m ftjax.export --workdir=DIR --out=DIR`.

  python -m ftjax.export --workdir=/tmp/run --out=/tmp/merged                # HF model
  python -m ftjax.export --workdir=/tmp/run --out=/tmp/adapter --format=peft # PEFT adapter
  python -m ftjax.export --workdir=/tmp/run --out=/tmp/best --checkpoint=best

`merged` writes a Hugging Face checkpoint (config.json, model.safetensors and
the tokenizer) that transformers loads; adapters (LoRA, ...) are merged into
the base weights first. `peft` (LoRA runs) writes adapter_config.json +
adapter_model.safetensors for `peft.PeftModel.from_pretrained(base, DIR)`,
with every other trained parameter (a new head) in `modules_to_save`.

The model is rebuilt from the run's config.json, as for training; the
checkpoint's trainable leaves are put over the base model's weights.
"""

import pathlib
import sys

import jax
import numpy as np
from absl import app, flags, logging

from ftjax import checkpoint as checkpoint_lib
from ftjax import config as config_lib
from ftjax import models, sharding
from ftjax.core import run as run_lib
from ftjax.core import state as state_lib
from ftjax.errors import CheckpointError, FtjaxError
from ftjax.models import keymap
from ftjax.peft import adapter as adapter_lib
from ftjax.peft import hf_adapter


def _step(workdir: pathlib.Path, config, which: str) -> int:
  checkpointer = checkpoint_lib.Checkpointer(workdir, config, read_only=True)
  try:
    steps = checkpoint_lib.select_steps(checkpointer, which)
  finally:
    checkpointer.close()
  if len(steps) != 1:
    raise CheckpointError(f"--checkpoint={which!r} picks {len(steps)} checkpoints in {workdir}; "
                          f"expected latest, best or one saved step")
  return steps[0]


def restore_params(workdir: str | pathlib.Path, which: str = "latest",
                   overrides: tuple[str, ...] = ()):
  """(config, model, params, tokenizer, step) of a run's checkpoint, on this host's devices."""
  workdir = pathlib.Path(workdir)
  config = config_lib.load_run_config(workdir, list(overrides))
  step = _step(workdir, config, which)
  mesh = sharding.make_mesh(config)
  model, params, _, tokenizer = run_lib.load_model(config, mesh)
  flat = dict(keymap.flatten(params))
  # The objective's own parameters (under "objective/") are not the model's: never exported.
  saved = {p: v for p, v in checkpoint_lib.read_trainable(workdir, step).items()
           if not p.startswith(state_lib.OBJECTIVE + "/")}
  for path, value in saved.items():
    if path not in flat or tuple(value.shape) != tuple(flat[path].shape):
      raise CheckpointError(f"checkpoint {workdir}/checkpoints/{step} has {path!r} "
                            f"{tuple(value.shape)}, which the run's model does not; was "
                            f"config.json edited?")
    flat[path] = jax.device_put(np.asarray(value, np.float32), flat[path].sharding)
  logging.info("restored %d trained parameters from %s step %d", len(saved), workdir, step)
  return config, model, keymap.unflatten(flat, model.abstract_params), tokenizer, step, saved


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, fmt: str = "merged",
           which: str = "latest", overrides: tuple[str, ...] = ()) -> pathlib.Path:
  out = pathlib.Path(out)
  if out.exists() and not out.is_dir():
    raise FtjaxError(f"--out={out} is a file; expected a folder to write the export to")
  config, model, params, tokenizer, step, saved = restore_params(workdir, which, overrides)
  if fmt == "peft":
    if not model.adapters:
      raise FtjaxError(f"--format=peft needs an adapter run (LoRA, DoRA, IA3, prompt or prefix "
                       f"tuning); {workdir} used strategy "
                       f"{config.strategy.name!r} (export it with --format=merged)")
    # Every other trained parameter (a new head) goes whole into modules_to_save.
    adapter_paths = set(adapter_lib.adapter_paths(model))
    extra = tuple(p for p in saved if p not in adapter_paths)
    hf_adapter.save_adapter(model, params, out, base_model_name_or_path=config.model.name_or_path,
                            modules_to_save=extra)
  else:
    if model.adapters:
      model, params = adapter_lib.merge_adapters(model, params)
    models.save_pretrained(params, model.config, out)
    tokenizer.save_pretrained(out)
  logging.info("exported %s step %d as %s to %s", workdir, step, fmt, out)
  return out


def _define_flags() -> None:
  """Flags only when run as a program: importing the library defines none (no clash with
  ftjax.evaluate's --workdir in one process)."""
  flags.DEFINE_string("workdir", None, "The training run's workdir.")
  flags.DEFINE_string("out", None, "Folder to write the export to.")
  flags.DEFINE_enum("format", "merged", ["merged", "peft"],
                    "merged: a Hugging Face checkpoint; peft: a PEFT adapter folder.")
  flags.DEFINE_string("checkpoint", "latest", "latest | best | a step number.")
  flags.DEFINE_multi_string("set", [], "key=value changes to the run's config "
                            "(e.g. model.name_or_path=/moved/base).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    out = export(f.workdir, f.out, fmt=f["format"].value, which=f.checkpoint,
                 overrides=tuple(f.set))
  except FtjaxError as e:
    sys.exit(f"ftjax: error: {e}")
  print(out)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
