"""Memory and compile-time options: remat, scan_layers, bf16 compute, activation sharding.

None of them may change what a step computes; each must change what it was
asked to: remat lowers XLA's temporary memory, scanning compiles one layer
body per run of alike layers (and keeps a frozen stack out of the backward
pass), bf16 computes in bfloat16 while the weights and Adam moments stay
float32, and the hidden state is constrained at every layer boundary.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftjax import config as config_lib
from ftjax import train
from ftjax.models import keymap, layers
from ftjax.peft import partition
from tests import tiny, tiny_bert
from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import bench_setup  # pylint: disable=g-import-not-at-top,wrong-import-position

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, minilm_dir, data_dir):
  root = tmp_path_factory.mktemp("execution")
  # Dropout on: a scanned stack must draw the loop's random bits.
  return (tiny_bert.make_model(root / "model", minilm_dir, num_layers=NUM_LAYERS, dropout=0.1),
          tiny_bert.make_data(root / "data", data_dir, sizes=(("train", 64),)))


def _config(dirs, **overrides):
  model_dir, data_path = dirs
  return tiny.config(model_dir, data_path, **{
      "eval.splits": (), "data.num_buckets": 1, "mesh.data": 2, "training.batch_size": 8,
      **overrides})


def _train(config, num_steps: int = 2):
  """Trainable params after `num_steps` steps, each step's loss, and the compiled step."""
  run = train.setup(config, devices=jax.devices()[:2])
  train_step, _ = train.compile_steps(run)
  batches = bench_setup.first_batches(run, num_steps)
  state, rng = run.initial_state, jax.random.key(config.seed)
  compiled = train_step.lower(state, batches[0], rng).compile()
  losses = []
  for batch in batches:
    state, step_metrics = compiled(state, batch, rng)
    losses.append(float(step_metrics["loss"]))
  return run, keymap.flatten(jax.device_get(state.trainable)), losses, compiled


def _assert_close(a: dict, b: dict, atol: float):
  assert a.keys() == b.keys()
  for path in a:
    np.testing.assert_allclose(a[path], b[path], atol=atol, rtol=0, err_msg=path)


FREEZE_2 = {"strategy.name": "freeze", "strategy.freeze_layers": 2}
SCAN = {"model.scan_layers": True}


@pytest.mark.parametrize("strategy,variants", [
    (FREEZE_2, ({"model.remat": "full"}, SCAN, {**SCAN, "model.remat": "dots_saveable"})),
    ({"strategy.name": "lora"}, ({**SCAN, "model.remat": "full"},)),
], ids=["freeze2", "lora"])
@pytest.mark.slow
def test_remat_and_scan_train_exactly_like_the_loop(dirs, strategy, variants):
  _, base_params, base_losses, _ = _train(_config(dirs, **strategy))
  for options in variants:
    run, params, losses, step = _train(_config(dirs, **strategy, **options))
    np.testing.assert_allclose(losses, base_losses, atol=1e-5, rtol=0, err_msg=str(options))
    _assert_close(params, base_params, atol=1e-5)
    if options.get("model.scan_layers"):
      # freeze K=2: the frozen layers 0-1 and the trainable 2-3 scan as two stacks.
      groups = ((0, 2), (2, 4)) if strategy == FREEZE_2 else ((0, 4),)
      assert run.model.config.execution.scan_groups == groups
      assert "while" in step.as_text()


def test_remat_cuts_activation_memory(dirs):
  """XLA's temporary bytes of a scanned stack's step on 256 x 64-token batches (compiled only).

  Scanned, each layer's recomputation happens inside its own loop iteration.
  (Unrolled, XLA:CPU's scheduler is free to hoist the recomputations and
  saves little; accelerator schedulers honour them. The step is the same.)
  """

  def temp_bytes(remat: str) -> int:
    run = train.setup(_config(dirs, **SCAN, **{"model.remat": remat}), devices=jax.devices()[:2])
    train_step, _ = train.compile_steps(run)
    real = bench_setup.first_batches(run, 1)[0]
    batch = {k: jax.ShapeDtypeStruct((256, 64)[:v.ndim], v.dtype, sharding=v.sharding)
             for k, v in real.items()}
    compiled = train_step.lower(run.initial_state, batch, jax.random.key(0)).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  none, full, dots = temp_bytes("none"), temp_bytes("full"), temp_bytes("dots_saveable")
  # Without remat every layer keeps its attention probabilities, dropout masks
  # and MLP activations for the backward pass; with full remat only its input.
  assert full < 0.5 * none, (full, none)
  assert full < dots <= none, (full, dots, none)


def test_scanning_traces_one_layer_body(dirs):
  """The traced step of a scanned stack holds one layer's matmuls, not NUM_LAYERS'."""
  loop = _count(_step_jaxpr(_config(dirs)), "dot_general")
  scanned = _count(_step_jaxpr(_config(dirs, **SCAN)), "dot_general")
  # Forward and backward matmuls of 4 layers, then of 1 (plus the head's, in both).
  assert scanned < 0.4 * loop, (scanned, loop)


def test_scanning_keeps_the_frozen_stack_out_of_the_backward_pass(dirs):
  """Matmuls a step executes: scanned freeze K=2 runs what the loop runs, far fewer than full."""
  loop = _count(_step_jaxpr(_config(dirs, **FREEZE_2)), "dot_general", executed=True)
  scanned = _count(_step_jaxpr(_config(dirs, **FREEZE_2, **SCAN)), "dot_general", executed=True)
  full = _count(_step_jaxpr(_config(dirs, **SCAN)), "dot_general", executed=True)
  # The one difference: the loop skips the input gradients of layer 2's q/k/v
  # (its input comes from a frozen layer); a scan body is the same every iteration.
  assert scanned - loop == 3
  # Layers 0-1 run forward only instead of forward and backward.
  assert scanned < 0.8 * full, (scanned, full)


def _step_jaxpr(config):
  run = train.setup(config, devices=jax.devices()[:2])
  step = train.make_train_step(run.objective, run.model, run.optimizer, run.learning_rate)
  batch = bench_setup.first_batches(run, 1)[0]
  return jax.make_jaxpr(step)(run.initial_state, run.refs, batch, jax.random.key(0)).jaxpr


def _count(jaxpr, primitive: str, *, executed: bool = False) -> int:
  """Equations of `primitive` in `jaxpr` and the jaxprs inside it (scan bodies, remat).

  `executed`: a scan body counts once per iteration, not once.
  """
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name == primitive
    times = eqn.params.get("length", 1) if executed and eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        inner = getattr(sub, "jaxpr", None)
        if inner is not None:
          count += times * _count(getattr(inner, "jaxpr", inner), primitive, executed=executed)
  return count


def test_layer_groups_follow_the_partition():
  paths = [f"encoder/layers/{i}/{m}" for i in range(4) for m in ("query/kernel", "mlp/kernel")]
  paths += [f"encoder/layers/{i}/query/lora_a" for i in (2, 3)] + ["classifier/out/kernel"]
  labels = partition.labels(paths, [(r"encoder/layers/[01]/.*", "frozen"),
                                    (r".*lora_a", "trainable"), (r".*", "frozen")])
  # Layers 0-1 have no adapter, 2-3 have one: two structures, two stacks.
  assert partition.layer_groups(labels) == ((0, 2), (2, 4))
  labels = partition.labels(paths, [(r"encoder/layers/1/.*", "trainable"), (r".*", "frozen")])
  assert partition.layer_groups(labels) == ((0, 1), (1, 2), (2, 4))


def test_decoder_scan_matches_the_loop_with_sliding_windows(tmp_path, data_dir):
  """Qwen2 with a window on the upper layers: the window splits the scan, results agree."""
  tiny.make_tokenizer(tmp_path / "tokenizer", data_dir)
  model_dir = tiny.make_decoder(tmp_path / "model", tmp_path / "tokenizer", model_type="qwen2",
                                num_layers=4, hf_overrides={
                                    "use_sliding_window": True, "sliding_window": 4,
                                    "max_window_layers": 2})
  from ftjax import models  # pylint: disable=g-import-not-at-top
  loaded = models.load_pretrained(str(model_dir), task="causal_lm")
  model, params = loaded.model, loaded.params
  windows = [model.config.window(i) for i in range(4)]
  assert windows == [None, None, 4, 4]
  ids = jax.random.randint(jax.random.key(0), (2, 12), 0, model.config.vocab_size)
  mask = jnp.ones_like(ids).at[1, :3].set(0)
  expected = model.apply(params, ids, mask).logits
  scanned = model.with_execution(layers.Execution(scan_groups=((0, 4),), remat="full"))
  np.testing.assert_allclose(scanned.apply(params, ids, mask).logits, expected, atol=1e-5)


def test_bf16_compute_keeps_float32_master_weights(dirs):
  _, f32_params, f32_losses, _ = _train(_config(dirs))
  run, params, losses, step = _train(_config(dirs, **{"model.dtype": "bfloat16"}))
  state = run.initial_state
  # Master weights and both Adam moments stay float32 ...
  f32 = {np.dtype("float32")}
  assert {x.dtype for x in jax.tree.leaves((state.trainable, state.frozen))} == f32
  assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == f32
  assert {x.dtype for x in params.values()} == f32
  # ... the matmuls run in bfloat16 ...
  assert "bf16[" in step.as_text()
  # ... and training follows the float32 run closely, not exactly.
  np.testing.assert_allclose(losses, f32_losses, atol=0.05)
  assert max(abs(a - b) for a, b in zip(losses, f32_losses)) > 0
  drift = max(float(np.abs(params[p] - f32_params[p]).max()) for p in params)
  assert 0 < drift < 0.01


def test_hidden_states_are_constrained_at_every_layer_boundary(dirs):
  config = _config(dirs)
  run = train.setup(config, devices=jax.devices()[:2])
  sharding = run.model.config.execution.activation_sharding
  assert sharding.spec == jax.sharding.PartitionSpec("data", None, None)
  train_step, _ = train.compile_steps(run)
  batch = bench_setup.first_batches(run, 1)[0]
  lowered = train_step.lower(run.initial_state, batch, jax.random.key(0)).as_text()
  # The embeddings' output and each layer's output, in the forward pass (and
  # again in the backward pass: a constraint's transpose is a constraint).
  assert lowered.count("sdy.sharding_constraint") >= NUM_LAYERS + 1
  # The rules decide: sequence parallelism is one more rule, no model change.
  rules = (*config.mesh.rules, ("activation_length", "tensor"))
  config = _config(dirs, **{"mesh.data": 1, "mesh.tensor": 2, "mesh.rules": rules})
  run = train.setup(config, devices=jax.devices()[:2])
  assert run.model.config.execution.activation_sharding.spec == jax.sharding.PartitionSpec(
      None, "tensor", None)


def test_remat_choices_agree():
  assert layers.REMAT_CHOICES == config_lib.REMAT_CHOICES
  with pytest.raises(Exception, match="model.remat.*'most'.*expected one of"):
    config_lib.validate(config_lib.override(config_lib.default_config(),
                                            {"model.remat": "most"}))
