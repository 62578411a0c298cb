"""Sequence-level distillation as a data step: the teacher writes the training responses.

  python -m ftjax.distill_data --config=configs/distill_smollm2.py --out=/tmp/seqkd
  python -m ftjax.main --config=configs/distill_smollm2.py --workdir=/tmp/student \
      --config.data.mixture="(('code', '/tmp/seqkd/code', 1.0), ('math', '/tmp/seqkd/math', 1.0))"

For every task of the config's instruction data (`data.mixture`, or
`data.path` as one task), the teacher (`objective.teacher`, else
`model.name_or_path`) answers each training prompt (rendered with
`data.template`, as training renders it) with greedy decoding
(`ftjax.generate`, batches of `eval.batch_size` prompts of similar length,
at most --max_new_tokens tokens); `<out>/<task>/<train split>.jsonl` holds
the original records with the teacher's answer as `data.output_column`, and
the task's other split files are linked beside it, so evaluation is on the
original references. Training a student on that folder (any objective,
including token-level distillation) is sequence-level distillation (Kim &
Rush, 2016). Files are written atomically; the line the program prints is
the `data.mixture` to train on.
"""

import json
import pathlib
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ftjax import files
from ftjax import generate as generate_lib
from ftjax import config as config_lib
from ftjax.core import sources as model_sources
from ftjax.data import instruct, sources
from ftjax.errors import FtjaxError


def distill_data(config, out: str | pathlib.Path, *, max_new_tokens: int = 256,
                 max_examples: int = 0) -> list[tuple[str, str, float]]:
  """Writes the teacher's answers (see the module docstring); returns the new mixture."""
  d = config.data
  if config.model.task != "causal_lm":
    raise FtjaxError(f"model.task={config.model.task!r}: sequence-level distillation writes "
                     f"instruction responses; expected a causal_lm config")
  teacher = config.objective.get("teacher", "") or config.model.name_or_path
  source = model_sources.load(teacher, task="causal_lm", dtype=config.model.dtype,
                              allow_pickle=config.model.allow_pickle, seed=config.seed)
  model, params, tokenizer = source.model, source.params, source.tokenizer
  special = d.template != "chat"
  out = pathlib.Path(out).absolute()
  mixture = []
  for name, path, weight in instruct.tasks(d):
    records = sources.load_records(path, d.train_split, d, max_examples=max_examples).to_list()
    prompts = [tokenizer(instruct.render(r, d, tokenizer), add_special_tokens=special)["input_ids"]
               for r in records]
    answers = [""] * len(records)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    batch = config.eval.batch_size
    for start in range(0, len(order), batch):
      rows = order[start:start + batch]
      result = generate_lib.generate(
          model, params, [prompts[i] for i in rows], max_new_tokens=max_new_tokens,
          eos_token_id=tokenizer.eos_token_id,
          pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
      for i, tokens in zip(rows, result.tokens):
        answers[i] = tokenizer.decode(tokens, skip_special_tokens=True)
      logging.info("task %s: %d of %d answers", name, min(start + batch, len(order)),
                   len(order))
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({**r, d.output_column: a}, ensure_ascii=False) + "\n"
             for r, a in zip(records, answers)]
    files.atomic_write_text(folder / f"{d.train_split}.jsonl", "".join(lines))
    original = pathlib.Path(path)
    if original.is_dir():
      for other in original.iterdir():
        target = folder / other.name
        if other.is_file() and other.stem != d.train_split and not target.exists():
          target.symlink_to(other.absolute())
    mixture.append((name, str(folder), weight))
  return mixture


def _define_flags() -> None:
  """Flags only when run as a program: importing the library defines none."""
  config_flags.DEFINE_config_file("config", None, "The student's experiment config.")
  flags.DEFINE_string("out", None, "Folder to write the teacher's answers to.")
  flags.DEFINE_integer("max_new_tokens", 256, "Longest answer, in tokens.")
  flags.DEFINE_integer("max_examples", 0, "Answer at most this many prompts per task (0: all).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    f = flags.FLAGS
    if f.out is None:
      raise FtjaxError("--out is required: the folder to write the teacher's answers to")
    config = config_lib.validate(f.config)
    mixture = distill_data(config, f.out, max_new_tokens=f.max_new_tokens,
                           max_examples=f.max_examples)
  except FtjaxError as e:
    sys.exit(f"ftjax: error: {e}")
  print(f"--config.data.path='' --config.data.mixture=\"{tuple(mixture)!r}\"")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
