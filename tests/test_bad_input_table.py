"""The bad-input table: every user mistake stops a run with one line naming the bad value.

Each case is one bad input. Most run in-process through `train.train_and_evaluate`
(the error is an `FtjaxError` whose message is one line); the `via_main` ones run
the real entry point, `python -m ftjax.main`, in a subprocess (exit status 1, a
single `ftjax: error:` line on stderr, no traceback). Classification cases run
against a copy of one finished tiny run, whose checkpoint files must come out
byte-identical: a bad input never damages the work already saved.

A subprocess costs ~8 s of CPU (imports, mostly), so only three cases use one,
started together while the in-process cases run; `main.py` turns any
`FtjaxError` into the same line, so in-process is enough for the rest.
"""

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

from ftjax import checkpoint as checkpoint_lib
from ftjax import config as config_lib
from ftjax import train
from ftjax.objectives import Classification
from ftjax.errors import FtjaxError
from tests import tiny
from tests.conftest import REPO

NUM_LAYERS = 2
POSITIONS = 128  # tiny.make_model's max_position_embeddings
# head_only and one bucket keep the finished run's compile short; max_length is
# the model's whole position table.
RUN = {"strategy.name": "head_only", "data.max_length": POSITIONS, "data.num_buckets": 1,
       "training.num_steps": 3, "eval.every_steps": 3, "eval.splits": ("validation",)}
LONG_REVIEWS = 3  # training examples longer than the model's positions
# Set by the cases that resume the finished run: 3 more steps, a save after each.
CONTINUE = {"training.num_steps": 6, "checkpoint.every_steps": 1}
# The finished run's model, distilled from the finished run itself.
DISTILL = {"objective.name": "distill", "objective.teacher": "<run>", "strategy.name": "full"}


@dataclasses.dataclass(frozen=True)
class Assets:
  model: pathlib.Path
  data: pathlib.Path


@dataclasses.dataclass(frozen=True)
class FinishedRun:
  workdir: pathlib.Path
  log: str
  hashes: dict[str, str]


@dataclasses.dataclass(frozen=True)
class LmAssets:
  model: pathlib.Path
  data: pathlib.Path


@pytest.fixture(scope="module")
def assets(tmp_path_factory, minilm_dir, data_dir) -> Assets:
  root = tmp_path_factory.mktemp("bad_input_assets")
  model = tiny.make_model(root / "model", minilm_dir, num_layers=NUM_LAYERS)
  # Saved with its classification head, so no run initialises (and compiles) a new one.
  transformers.BertForSequenceClassification.from_pretrained(
      model, num_labels=2).save_pretrained(model)
  data = tiny.make_data(root / "data", data_dir)
  with open(data / "train.jsonl", "a", encoding="utf-8") as f:
    for _ in range(LONG_REVIEWS):
      f.write(json.dumps({"text": "a wonderful film " * 100, "label": 1}) + "\n")
  return Assets(model, data)


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> FinishedRun:
  """A finished 3-step run (checkpoint at step 3), with its absl log."""
  workdir = tmp_path_factory.mktemp("finished_run")
  with _absl_log() as log:
    train.train_and_evaluate(_config(assets), str(workdir), devices=jax.devices()[:1])
  hashes = _checkpoint_hashes(workdir)
  assert any(name.startswith("3/state/") for name in hashes), sorted(hashes)
  return FinishedRun(workdir, "\n".join(log), hashes)


@pytest.fixture(scope="module")
def lm_assets(tmp_path_factory, data_dir) -> LmAssets:
  root = tmp_path_factory.mktemp("bad_input_lm")
  tiny.make_tokenizer(root / "tokenizer", data_dir)
  return LmAssets(tiny.make_decoder(root / "model", root / "tokenizer"),
                  tiny.make_instruct_data(root / "data", data_dir, "instruction"))


def _config(assets: Assets, overrides: dict | None = None):
  """The finished run's config with `overrides` set after validation, as a user's bad values are."""
  return config_lib.override(tiny.config(assets.model, assets.data, **RUN), overrides or {})


class _Lines(logging.Handler):

  def __init__(self):
    super().__init__(logging.INFO)
    self.lines: list[str] = []

  def emit(self, record: logging.LogRecord) -> None:
    self.lines.append(record.getMessage())


@contextlib.contextmanager
def _absl_log():
  """The absl INFO messages logged inside the block (INFO is off without absl flags)."""
  logger, handler = logging.getLogger("absl"), _Lines()
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield handler.lines
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _checkpoint_hashes(workdir: pathlib.Path) -> dict[str, str]:
  """sha256 of every file under workdir/checkpoints, by relative path."""
  root = workdir / "checkpoints"
  return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
          for path in sorted(root.rglob("*")) if path.is_file()}


# ------------------------------------------------------------------ data edits


def _edit_jsonl(name: str, edit: Callable[[list[dict]], None]) -> Callable[[pathlib.Path], None]:
  def apply(folder: pathlib.Path) -> None:
    path = folder / name
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    edit(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
  return apply


def _set_field(index: int, key: str, value) -> Callable[[list[dict]], None]:
  def edit(records: list[dict]) -> None:
    records[index][key] = value
  return edit


def _drop_output(records: list[dict]) -> None:
  for record in records:
    del record["output"]


def _latin1_review(folder: pathlib.Path) -> None:
  with open(folder / "train.jsonl", "ab") as f:
    f.write('{"text": "un film très réussi", "label": 1}\n'.encode("latin-1"))


def _not_json(folder: pathlib.Path) -> None:
  (folder / "train.jsonl").write_text("text,label\na fine film,1\n", encoding="utf-8")


def _empty_validation(folder: pathlib.Path) -> None:
  (folder / "validation.jsonl").write_text("", encoding="utf-8")


def _no_validation(folder: pathlib.Path) -> None:
  (folder / "validation.jsonl").unlink()


# --------------------------------------------------------- simulated failures


def _nan_loss(monkeypatch) -> None:
  real = Classification.loss

  def nan_loss(*args, **kwargs):
    loss, sums = real(*args, **kwargs)
    return loss * float("nan"), sums

  monkeypatch.setattr(Classification, "loss", nan_loss)


def _full_disk(error: Callable[[pathlib.Path], Exception]) -> Callable:
  """A patch under which every checkpoint save fails with `error(path)`, as on a full disk."""

  def patch(monkeypatch) -> None:
    def save(self, step, *args, **kwargs):
      raise error(self.directory / str(step))
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)

  return patch


def _enospc(path: pathlib.Path) -> Exception:
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _tensorstore_enospc(path: pathlib.Path) -> Exception:
  """What orbax raises when a real disk fills (seen on a full tmpfs): TensorStore's ValueError."""
  return ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{path}/state/_sharding": '
                    f"Failed to write 2758 bytes to file 9: No space left on device "
                    f"[os_error_code='{errno.ENOSPC}']")


# ------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input and what its error line must contain.

  Strings in `overrides`, `expected` and `config_edit` may say <data> (this
  case's data folder), <workdir> (its workdir), <run> (the finished run's
  workdir) or <lm_data>.
  """
  name: str
  example: str  # the bad input as a user would write it (the README table)
  overrides: dict = dataclasses.field(default_factory=dict)
  expected: tuple[str, ...] = ()  # the bad value, and what was expected
  edit_data: Callable[[pathlib.Path], None] | None = None
  lm: bool = False  # the tiny decoder (fresh workdir) instead of the finished BERT run
  via_main: bool = False  # `python -m ftjax.main` in a subprocess
  config_edit: str = ""  # via_main: a line of the config file, after loading the run's config
  patch: Callable | None = None  # (monkeypatch) -> None: simulates a failure mid-run
  marks: tuple = ()


CASES = [
    # Config values (ftjax.config.validate, before anything loads).
    Case("negative_learning_rate", "--config.optimizer.learning_rate=-1e-3",
         {"optimizer.learning_rate": -1e-3},
         ("'optimizer.learning_rate' is -0.001", "expected a learning rate > 0")),
    Case("lora_rank_0", "--config.strategy.name=lora --config.strategy.lora.rank=0",
         {"strategy.name": "lora", "strategy.lora.rank": 0},
         ("'strategy.lora.rank' is 0", "expected a LoRA rank >= 1")),
    Case("unknown_strategy", "--config.strategy.name=adapters", {"strategy.name": "adapters"},
         ("'strategy.name' is 'adapters'", "expected one of ('full', 'freeze', 'head_only', "
          "'lora', 'ia3'")),
    Case("unknown_objective", "--config.objective.name=regresion",
         {"objective.name": "regresion"},
         ("'objective.name' is 'regresion'", "expected one of (", "'classification'",
          "ftjax.objectives.register")),
    Case("unknown_adapter", "--config.strategy.adapters=\"('lora', 'ia4')\"",
         {"strategy.adapters": ("lora", "ia4")},
         ("'strategy.adapters' is ('lora', 'ia4')", "expected distinct names of (", "'lora'")),
    Case("adapters_with_head_only", "--config.strategy.adapters=\"('lora',)\" (head_only)",
         {"strategy.adapters": ("lora",)},
         ("'strategy.adapters' is ('lora',)", "() with strategy.name='head_only'")),
    Case("unknown_config_key", "config.model.nmae = 'x' in a config file", {"model.nmae": "x"},
         ("unknown config key 'model.nmae'", "expected one of model.allow_pickle")),
    Case("wrong_type", "config.training.batch_size = True", {"training.batch_size": True},
         ("'training.batch_size' is True (bool); expected a", "int")),
    Case("wrong_type_in_config_file", "config.eval.splits = 'validation' in a config file",
         expected=("field 'splits'", "validation is of original type <class 'str'>",
                   "type <class 'tuple'>"),
         via_main=True, config_edit="config.eval.splits = 'validation'"),
    Case("metric_not_in_eval_splits", "--config.eval.metric=test/accuracy",
         {"eval.metric": "test/accuracy"},
         ("'eval.metric' is 'test/accuracy'", "a split of eval.splits ('validation',)")),
    Case("packing_with_classification", "--config.data.packing=True", {"data.packing": True},
         ("'data.packing' is True", "expected False unless model.task='causal_lm'")),
    # Sizes that depend on the devices, the model or the data.
    Case("batch_not_divisible_by_data_parallel", "--config.training.batch_size=12 (8 devices)",
         {"training.batch_size": 12},
         ("training.batch_size=12 is not a multiple of 8", "data-parallel size 8")),
    Case("mesh_does_not_divide_devices", "--config.mesh.tensor=3 (8 devices)",
         {"mesh.tensor": 3}, ("'tensor': 3}", "does not divide the 8 devices")),
    Case("freeze_layers_beyond_model", "--config.strategy.name=freeze "
         "--config.strategy.freeze_layers=5 (2 layers)",
         {"strategy.name": "freeze", "strategy.freeze_layers": 5},
         ("strategy.freeze_layers=5 but the model has 2 layers", "expected 0..2")),
    Case("lora_target_matches_nothing", "--config.strategy.lora.targets=\"('.*/attn/q_proj',)\"",
         {"strategy.name": "lora", "strategy.lora.targets": (".*/attn/q_proj",)},
         ("LoRA target '.*/attn/q_proj' matches no dense layer", "module paths such as")),
    Case("warmup_not_shorter_than_training", "--config.optimizer.warmup_steps=3 "
         "(3 training steps)", {"optimizer.warmup_steps": 3},
         ("optimizer.warmup_steps=3 but training has 3 steps", "expected fewer warmup steps")),
    Case("batch_larger_than_training_split", "--config.training.batch_size=512 (259 examples)",
         {"training.batch_size": 512},
         ("training.batch_size=512 is larger than the training split",
          "expected at least one full batch")),
    # Data.
    Case("missing_text_column", "--config.data.text_column=sentence",
         {"data.text_column": "sentence"},
         ("data.text_column 'sentence' is not a column", "available columns: text, label")),
    Case("missing_label_column", "--config.data.label_column=sentiment",
         {"data.label_column": "sentiment"},
         ("data.label_column 'sentiment' is not a column", "available columns: text, label")),
    Case("label_outside_num_labels", '{"label": 2} with model.num_labels=2',
         expected=("label 2 of example 5", "expected class ids below model.num_labels=2",
                   "1 of 259 examples out of range"),
         edit_data=_edit_jsonl("train.jsonl", _set_field(5, "label", 2))),
    Case("label_not_an_integer", '{"label": "pos"}',
         expected=("holds 'pos' (str) at example 5", "expected integer class ids in [0, 2)"),
         edit_data=_edit_jsonl("train.jsonl", _set_field(5, "label", "pos"))),
    Case("text_not_a_string", '{"text": null}',
         expected=("text column 'text' holds None (NoneType) at example 7",
                   "expected a string"),
         edit_data=_edit_jsonl("train.jsonl", _set_field(7, "text", None))),
    Case("empty_split", "an empty validation.jsonl",
         expected=("split 'validation' is empty", "<data>/validation.jsonl",
                   "expected at least one example"),
         edit_data=_empty_validation),
    Case("file_not_utf8", "a Latin-1 byte in train.jsonl",
         expected=("'<data>/train.jsonl' is not UTF-8 (byte ", "re-encode it as UTF-8"),
         edit_data=_latin1_review, via_main=True),
    Case("file_not_json", "CSV text in train.jsonl",
         expected=("'<data>/train.jsonl' is not valid JSON (line 1 'text,label': Expecting value)",
                   "expected one record per line"),
         edit_data=_not_json),
    Case("missing_data_file", "no validation.jsonl",
         expected=("no file for split 'validation' in '<data>'", "expected validation.jsonl"),
         edit_data=_no_validation),
    # The workdir and checkpoints.
    Case("workdir_of_another_config", "the finished run's --workdir with --config.seed=1",
         {"seed": 1}, ("holds a checkpoint of another run (seed was 0, the config says 1)",
                       "use a new --workdir"), via_main=True),
    Case("disk_full_during_save", "ENOSPC while saving a checkpoint (simulated)", CONTINUE,
         ("<workdir>/checkpoints (No space left on device)", "checkpoints [3] are intact"),
         patch=_full_disk(_enospc)),
    Case("disk_full_in_tensorstore", "a full disk as TensorStore reports it (simulated)",
         CONTINUE,
         ("<workdir>/checkpoints (No space left on device)", "checkpoints [3] are intact"),
         patch=_full_disk(_tensorstore_enospc)),
    Case("nan_loss", "a NaN loss at step 4 (simulated)", CONTINUE,
         ("loss is nan (grad norm nan) at step 4", "Lower optimizer.learning_rate"),
         patch=_nan_loss),
    # Instruction tuning (the tiny decoder).
    Case("init_from_other_architecture", "a decoder run with --config.init_from=<BERT run>",
         {"init_from": "<run>"},
         ("init_from='<run>': none of its 2 parameters fit this model",
          "another architecture"), lm=True),
    Case("freeze_layers_beyond_decoder", "--config.strategy.name=freeze "
         "--config.strategy.freeze_layers=3 (2 layers)",
         {"strategy.name": "freeze", "strategy.freeze_layers": 3},
         ("strategy.freeze_layers=3 but the model has 2 layers", "expected 0..2"), lm=True),
    Case("mixture_weight_0", "--config.data.mixture=\"(('code', DIR, 0.0),)\"",
         {"data.path": "", "data.mixture": (("code", "<lm_data>", 0.0),)},
         ("'data.mixture' is ('code', '<lm_data>', 0.0)", "(name, path, weight > 0)"), lm=True),
    Case("instruct_output_column_missing", "records without \"output\"",
         expected=("data.output_column 'output' is not a column",
                   "available columns: instruction, input"),
         edit_data=_edit_jsonl("train.jsonl", _drop_output), lm=True),
    Case("prompt_fills_max_length", "--config.data.max_length=16 (every prompt is longer)",
         {"data.max_length": 16},
         ("has a prompt of at least data.max_length=16 tokens",
          "expected a larger data.max_length"), lm=True),
    # Distillation (ftjax.objectives.distill) and students cut from a model's layers.
    Case("model_layers_out_of_range", "--config.model.layers=\"(0, 5)\" (2 layers)",
         {"model.layers": (0, 5)},
         ("'model.layers' is (0, 5); expected increasing layer indices in [0, 2)",)),
    Case("distill_temperature_0", "--config.objective.name=distill "
         "--config.objective.temperature=0", DISTILL | {"objective.temperature": 0.0},
         ("'objective.temperature' is 0.0; expected a temperature > 0",)),
    Case("distill_alpha_outside_0_1", "--config.objective.name=distill --config.objective.alpha=1.5",
         DISTILL | {"objective.alpha": 1.5},
         ("'objective.alpha' is 1.5; expected a weight in [0, 1]",)),
    Case("distill_teacher_other_vocabulary", "a Llama teacher (2,048-token BPE) for a BERT "
         "student", DISTILL | {"objective.teacher": "<lm_model>"},
         ("the teacher '<lm_model>' (llama, 2048-token vocabulary",
          "and the student '<model>' (bert, 30522-token vocabulary",
          "expected the same tokenizer")),
    Case("head_only_on_causal_lm", "--config.strategy.name=head_only with a decoder",
         {"strategy.name": "head_only"},
         ("strategy.name='head_only' leaves no parameter", "choose full, freeze or lora"),
         lm=True),
    # PEFT methods (ftjax.peft): each checks its own config group.
    Case("quant_unknown_method", "--config.strategy.name=lora --config.strategy.quant.method=nf5",
         {"strategy.name": "lora", "strategy.quant.method": "nf5"},
         ("strategy.quant.method='nf5'", "expected 'nf4' or 'int8'")),
    Case("quant_block_does_not_divide_a_kernel",
         "--config.strategy.quant.method=nf4 --config.strategy.quant.block_size=48",
         {"strategy.name": "lora", "strategy.quant.method": "nf4",
          "strategy.quant.block_size": 48},
         ("strategy.quant.block_size=48 does not divide kernel 'encoder/layers/0/",
          "expected a block size that divides every quantised kernel")),
    Case("bottleneck_unknown_style", "--config.strategy.name=bottleneck "
         "--config.strategy.bottleneck.style=houlsbi",
         {"strategy.name": "bottleneck", "strategy.bottleneck.style": "houlsbi"},
         ("bottleneck style 'houlsbi'", "expected one of 'houlsby', 'pfeiffer'")),
    Case("ia3_feedforward_not_a_target", "--config.strategy.name=ia3 "
         "--config.strategy.ia3.feedforward=\"('.*/attention/output',)\"",
         {"strategy.name": "ia3", "strategy.ia3.feedforward": (".*/attention/output",)},
         ("IA3 feedforward target '.*/attention/output' matches",
          "expected feedforward targets to be a subset of the targets")),
    Case("prompt_without_virtual_tokens", "--config.strategy.name=prompt "
         "--config.strategy.prompt.num_virtual_tokens=0",
         {"strategy.name": "prompt", "strategy.prompt.num_virtual_tokens": 0},
         ("'strategy.prompt.num_virtual_tokens' is 0", "expected at least 1 virtual token")),
    Case("prompt_beyond_the_models_positions", "--config.strategy.name=prompt "
         "--config.strategy.prompt.num_virtual_tokens=4 (data.max_length=128 = the positions)",
         {"strategy.name": "prompt", "strategy.prompt.num_virtual_tokens": 4},
         ("data.max_length=128 + strategy.prompt.num_virtual_tokens=4 exceed the 128 positions",
          "expected data.max_length <= 124 (or fewer virtual tokens)")),
]


def _fill(value, paths: dict[str, str]):
  """`value` with the <...> paths replaced, through tuples and dicts."""
  if isinstance(value, str):
    for token, path in paths.items():
      value = value.replace(token, path)
    return value
  if isinstance(value, tuple):
    return tuple(_fill(v, paths) for v in value)
  if isinstance(value, dict):
    return {k: _fill(v, paths) for k, v in value.items()}
  return value


def _one_line(message: str) -> str:
  assert message and "\n" not in message and message == message.strip(), repr(message)
  return message


CONFIG_FILE = '''"""A finished run's config, then one edit."""
import pathlib

from ftjax import config as config_lib


def get_config():
  config = config_lib.load_run_config(pathlib.Path({workdir!r}), [])
  {edit}
  return config
'''


@dataclasses.dataclass(frozen=True)
class Prepared:
  workdir: pathlib.Path
  paths: dict[str, str]
  overrides: dict


def _prepare(case: Case, root: pathlib.Path, assets: Assets, finished_run: FinishedRun,
             lm: LmAssets | None, lm_model: pathlib.Path | None = None) -> Prepared:
  """The case's data folder (edited) and workdir (a copy of the finished run) under `root`."""
  data = root / "data"
  shutil.copytree(lm.data if lm else assets.data, data)
  if case.edit_data:
    case.edit_data(data)
  workdir = root / "workdir"
  paths = {"<data>": str(data), "<run>": str(finished_run.workdir), "<workdir>": str(workdir),
           "<lm_data>": str(lm.data) if lm else "", "<model>": str(assets.model),
           "<lm_model>": str(lm_model or "")}
  if not lm:  # The bad input must leave the finished run's checkpoint alone.
    shutil.copytree(finished_run.workdir, workdir)
  return Prepared(workdir, paths, _fill({"data.path": str(data), **case.overrides}, paths))


@pytest.fixture(scope="module")
def main_runs(request, assets, finished_run, tmp_path_factory):
  """case name -> (Prepared, `python -m ftjax.main` process, stderr file) of the selected cases.

  Started together as soon as the finished run exists, they run (mostly
  seconds of imports) while the in-process cases do; a via_main case waits
  for its own process.
  """
  selected = {item.callspec.params["case"].name for item in request.session.items
              if "case" in getattr(getattr(item, "callspec", None), "params", {})}
  started = {}
  for case in CASES:
    if not case.via_main or case.name not in selected:
      continue
    root = tmp_path_factory.mktemp(case.name)
    prepared = _prepare(case, root, assets, finished_run, None)
    config_file = root / "config.py"
    config_file.write_text(CONFIG_FILE.format(workdir=str(finished_run.workdir),
                                              edit=_fill(case.config_edit, prepared.paths)))
    with open(root / "stderr.txt", "w", encoding="utf-8") as stderr:
      process = subprocess.Popen(  # pylint: disable=consider-using-with
          [sys.executable, "-m", "ftjax.main", f"--config={config_file}",
           f"--workdir={prepared.workdir}",
           *(f"--config.{key}={value}" for key, value in prepared.overrides.items())],
          cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    started[case.name] = (prepared, process, root / "stderr.txt")
  yield started
  for _, process, _ in started.values():  # Only if a test stopped before waiting for it.
    if process.poll() is None:
      process.kill()
      process.wait()


def _error_line(returncode: int, stderr: str) -> str:
  """The `ftjax: error:` line of a failed `python -m ftjax.main`, after checking how it failed."""
  assert returncode == 1, stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  errors = [line for line in stderr.splitlines() if line.startswith("ftjax: error:")]
  assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
  return errors[0][len("ftjax: error: "):]


# The via_main cases last: their processes run while the others do.
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks)
                                  for c in sorted(CASES, key=lambda c: c.via_main)])
def test_bad_input_fails_with_one_clear_line(case, request, assets, finished_run, main_runs,
                                             tmp_path, monkeypatch):
  lm = request.getfixturevalue("lm_assets") if case.lm else None
  if case.via_main:
    prepared, process, stderr = main_runs[case.name]
    returncode = process.wait(timeout=300)
    line = _error_line(returncode, stderr.read_text(encoding="utf-8"))
  else:
    lm_model = (request.getfixturevalue("lm_assets").model
                if "<lm_model>" in repr(case.overrides) else None)
    prepared = _prepare(case, tmp_path, assets, finished_run, lm, lm_model)
    if lm:
      config = config_lib.override(tiny.lm_config(lm.model, lm.data), prepared.overrides)
    else:
      config = _config(assets, prepared.overrides)
    if case.patch:
      case.patch(monkeypatch)
    with pytest.raises(FtjaxError) as error:
      # The resumed cases on one device: a shorter compile, and any mesh restores.
      train.train_and_evaluate(config, str(prepared.workdir),
                               devices=jax.devices()[:1] if case.patch else None)
    line = _one_line(str(error.value))
    monkeypatch.undo()

  for text in _fill(case.expected, prepared.paths):
    assert text in line, line
  workdir = prepared.workdir
  if lm:
    assert not list(workdir.glob("checkpoints/[0-9]*")), list(workdir.rglob("*"))
  else:
    assert _checkpoint_hashes(workdir) == finished_run.hashes
  if case.patch:  # It got as far as resuming: the saved checkpoint still restores.
    restored = checkpoint_lib.read_trainable(workdir, 3)
    original = checkpoint_lib.read_trainable(finished_run.workdir, 3)
    assert restored.keys() == original.keys()
    for path, value in original.items():
      np.testing.assert_array_equal(restored[path], value, err_msg=path)


# ------------------------------------------------- not an error: truncation


def test_sequences_longer_than_the_models_positions_are_truncated_and_counted(finished_run):
  """max_length = the model's 128 positions; 3 reviews have ~300 tokens: a normal run."""
  results = json.loads((finished_run.workdir / "results.json").read_text())
  assert results["step"] == 3 and np.isfinite(results["validation/loss"])
  examples = 256 + LONG_REVIEWS
  assert (f"tokenised {examples} examples; {LONG_REVIEWS} "
          f"({100 * LONG_REVIEWS / examples:.1f}%) truncated to max_length={POSITIONS}"
          in finished_run.log), finished_run.log


def test_max_length_beyond_the_models_positions_truncates_to_them(assets, caplog):
  """data.max_length=512 on a 128-position model: no row may need position 128 or more."""
  caplog.set_level(logging.INFO, logger="absl")
  run = train.setup(_config(assets, {"data.max_length": 4 * POSITIONS}), jax.devices()[:1])
  assert run.buckets[-1] == POSITIONS and run.train_split.lengths.max() == POSITIONS
  examples = 256 + LONG_REVIEWS
  assert (f"tokenised {examples} examples; {LONG_REVIEWS} "
          f"({100 * LONG_REVIEWS / examples:.1f}%) truncated to max_length={POSITIONS}"
          in caplog.text), caplog.text
  assert f"data.max_length={4 * POSITIONS} is more than the {POSITIONS} positions" in caplog.text
