"""Bad inputs to `python -m ftjax.main`: one clear line, exit status 1, no traceback."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from ftjax import models
from tests import hf_models
from tests.conftest import REPO

CONFIG = "configs/sentiment_minilm.py"


def run_main(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "ftjax.main", f"--config={CONFIG}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def assert_one_line_error(result, *expected):
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ftjax: error: "), result.stderr[-2000:]
  for text in expected:
    assert text in last, last


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_bert")
  hf_models.tiny_model("bert", "classification").save_pretrained(path)
  return path


def _edit_checkpoint(src, dst, edit):
  dst.mkdir()
  (dst / "config.json").write_text((src / "config.json").read_text())
  tensors = load_file(src / "model.safetensors")
  edit(tensors)
  save_file(tensors, dst / "model.safetensors")
  return dst


def test_folder_without_config_json(tmp_path):
  result = run_main(f"--workdir={tmp_path / 'w'}", f"--config.model.name_or_path={tmp_path}")
  assert_one_line_error(result, str(tmp_path), "has no config.json")


def test_unsupported_model_type_lists_supported(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
  result = run_main(f"--workdir={tmp_path / 'w'}", f"--config.model.name_or_path={tmp_path}")
  assert_one_line_error(result, "'gpt_neox'", "not supported", "bert, distilbert, gpt2, llama, mistral, qwen2, qwen3, roberta")


def test_checkpoint_missing_a_tensor_is_named(tiny_bert, tmp_path):
  name = "bert.encoder.layer.1.attention.self.key.weight"
  ckpt = _edit_checkpoint(tiny_bert, tmp_path / "ckpt", lambda t: t.pop(name))
  result = run_main(f"--workdir={tmp_path / 'w'}", f"--config.model.name_or_path={ckpt}")
  assert_one_line_error(result, f"missing tensor '{name}'",
                        "encoder/layers/1/attention/key/kernel")


def test_tensor_with_wrong_shape_names_both_shapes(tiny_bert, tmp_path):
  name = "bert.encoder.layer.0.intermediate.dense.weight"

  def shrink(tensors):
    tensors[name] = np.zeros((36, 32), np.float32)

  ckpt = _edit_checkpoint(tiny_bert, tmp_path / "ckpt", shrink)
  result = run_main(f"--workdir={tmp_path / 'w'}", f"--config.model.name_or_path={ckpt}")
  assert_one_line_error(result, f"'{name}'", "(36, 32)", "(37, 32)")


def test_unexpected_tensor_is_named(tiny_bert, tmp_path):
  ckpt = _edit_checkpoint(tiny_bert, tmp_path / "ckpt",
                          lambda t: t.update({"bert.extra.weight": np.zeros(3, np.float32)}))
  result = run_main(f"--workdir={tmp_path / 'w'}", f"--config.model.name_or_path={ckpt}")
  assert_one_line_error(result, "'bert.extra.weight'", "match no parameter")


def test_unknown_config_override(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--config.model.nmae=x")
  assert_one_line_error(result, "unknown config key 'model.nmae'")


def test_wrong_type_config_override(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--config.training.batch_size=abc")
  assert_one_line_error(result, "--config.training.batch_size=abc")


def test_unknown_key_in_config_file(tmp_path):
  config_file = tmp_path / "typo.py"
  config_file.write_text(
      "from ftjax import config as c\n"
      "def get_config():\n"
      "  cfg = c.default_config()\n"
      "  cfg.model.nmae = 'x'\n"
      "  return cfg\n")
  result = subprocess.run(
      [sys.executable, "-m", "ftjax.main", f"--config={config_file}", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert_one_line_error(result, "unknown config key 'model.nmae'")
  assert not (tmp_path / "config.json").exists()  # failed before anything ran


def test_bad_config_value(tmp_path):
  result = run_main(f"--workdir={tmp_path}", "--config.model.task=regression")
  assert_one_line_error(result, "'model.task'", "'regression'", "classification")


def test_hub_id_while_offline(tmp_path):
  result = run_main(f"--workdir={tmp_path / 'w'}", "--config.model.name_or_path=bert-base-uncased",
                    env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")})
  assert_one_line_error(result, "'bert-base-uncased'", "HF_HUB_OFFLINE",
                        "--config.model.name_or_path=DIR")


def test_missing_data_folder(tmp_path):
  result = run_main(f"--workdir={tmp_path}", f"--config.data.path={tmp_path / 'nope'}")
  assert_one_line_error(result, "data.path", "does not exist")


def test_pickle_checkpoint_is_refused_unless_allowed(tmp_path):
  pt_model = hf_models.tiny_model("bert", "classification")
  pt_model.save_pretrained(tmp_path / "safe")
  (tmp_path / "pickle").mkdir()
  (tmp_path / "pickle" / "config.json").write_text((tmp_path / "safe" / "config.json").read_text())
  torch.save(pt_model.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")

  result = run_main(f"--workdir={tmp_path / 'w'}",
                    f"--config.model.name_or_path={tmp_path / 'pickle'}")
  assert_one_line_error(result, "pytorch_model.bin", "allow_pickle=True")

  _, from_pickle = models.from_pretrained(str(tmp_path / "pickle"), task="classification",
                                          allow_pickle=True)
  _, from_safe = models.from_pretrained(str(tmp_path / "safe"), task="classification")
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, from_pickle, from_safe)


def test_missing_config_file(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ftjax.main", "--config=configs/nope.py", f"--workdir={tmp_path}"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert_one_line_error(result, "--config=configs/nope.py: no such file",
                        "expected an experiment config such as configs/sentiment_minilm.py")


def test_workdir_that_is_a_file(tiny_bert, tmp_path):
  (tmp_path / "run").write_text("not a folder")
  result = run_main(f"--workdir={tmp_path / 'run'}", f"--config.model.name_or_path={tiny_bert}")
  assert_one_line_error(result, f"workdir {tmp_path / 'run'} is a file; expected a folder")
  assert (tmp_path / "run").read_text() == "not a folder"


def test_empty_workdir(tiny_bert):
  result = run_main("--workdir=", f"--config.model.name_or_path={tiny_bert}")
  assert_one_line_error(result, "--workdir is empty; expected a folder")


def _script(*args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_export_to_a_file_and_tables_of_missing_runs(tmp_path):
  (tmp_path / "afile").write_text("keep me")
  # --out is checked before any checkpoint is read (the workdir need not exist).
  result = _script("-m", "ftjax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'afile'}")
  assert_one_line_error(result, f"--out={tmp_path / 'afile'} is a file; expected a folder")
  assert (tmp_path / "afile").read_text() == "keep me"
  result = _script("scripts/results_table.py", str(tmp_path / "nope"))
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"results_table: error: {tmp_path / 'nope'} has no readable results.json")
  for script in ("experiments/distill_minilm.py", "experiments/distill_smollm2.py"):
    result = _script(script, f"--sweep_dir={tmp_path / 'afile'}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--sweep_dir={tmp_path / 'afile'} is a file" in result.stderr.strip().splitlines()[-1]
