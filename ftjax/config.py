"""The config schema: every key ftjax reads, its default, and its checks.

An experiment file `configs/<exp>.py` starts from `default_config()` and
changes what it needs. `validate` then rejects, before any model is loaded,
keys the schema does not have (a typo such as `model.nmae`) and values of the
wrong type or outside their range, naming the key.
"""

import ast
import importlib
import json
import os
import pathlib
import re
from typing import NamedTuple

import ml_collections
from ml_collections import config_dict

from ftjax.errors import ConfigError

from ftjax.models.layers import REMAT_CHOICES

TASKS = ("encoder", "classification", "decoder", "causal_lm")
DTYPES = ("float32", "bfloat16", "float16")
POOLINGS = ("pooler", "cls", "mean", "last")
SOURCES = ("files", "hf", "tfds")
# Besides these, every adapter registered as a strategy (`ftjax.peft`: lora,
# ia3, ...) is a strategy.name: the adapters and the head train.
STRATEGIES = ("full", "freeze", "head_only")
MESH_AXES = ("data", "fsdp", "tensor")
TEMPLATES = ("alpaca", "chat", "raw")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  # A Hugging Face hub id or a local folder with config.json + model.safetensors.
  c.model.name_or_path = ""
  # "classification" adds the family's sequence-classification head;
  # "causal_lm" a decoder's language-model head (instruction tuning);
  # "encoder" / "decoder" is the bare model (hidden states).
  c.model.task = "classification"
  # Classes of the classification head; None: from the checkpoint's id2label.
  c.model.num_labels = config_dict.placeholder(int)
  # What the classifier reads: "pooler" (the Hugging Face head as pre-trained:
  # BERT's pooler, RoBERTa's/DistilBERT's dense over the first token), "cls"
  # (the first token's hidden state) or "mean" (mean over non-padding tokens).
  c.model.pooling = "pooler"
  # Compute dtype; parameters (the master weights) and optimizer state stay
  # float32 whatever it is: "bfloat16" is mixed precision.
  c.model.dtype = "float32"
  # Rematerialisation of each layer in the backward pass: "none", "full"
  # (recompute the whole layer; least memory), "dots_saveable" (keep matmul
  # outputs, recompute the elementwise work) or
  # "dots_with_no_batch_dims_saveable" (keep the weight matmuls' outputs only).
  c.model.remat = "none"
  # Run runs of alike layers as one jax.lax.scan (one layer traced instead of
  # L; frozen and trainable layers scan separately). Same results and
  # checkpoints either way; with remat, each layer's recomputation stays in
  # its loop iteration.
  c.model.scan_layers = False
  # pytorch_model.bin is a pickle (it can run code when loaded): refused unless True.
  c.model.allow_pickle = False
  # Keep only these layers of the checkpoint's stack, renumbered 0, 1, ... (a
  # student cut from its teacher: (0, 2, 4) of 6 layers); () keeps them all.
  c.model.layers = ()

  # What the run optimises (`ftjax.objectives`): "" is the objective of
  # model.task ("classification" or "causal_lm"); a registered objective's
  # own keys live beside `name` in this group (its defaults are filled in).
  c.objective = ml_collections.ConfigDict()
  c.objective.name = ""
  # The module that registers objective.name when it is not one of ftjax's
  # (filled in from the registered class, recorded in config.json, imported
  # again by the evaluator and export).
  c.objective.module = ""

  c.data = ml_collections.ConfigDict()
  # "files": local files under `path`; "hf": Hugging Face hub dataset `name`;
  # "tfds": TensorFlow Datasets `name` (needs `pip install -e .[tfds]`).
  c.data.source = "files"
  c.data.name = ""
  # A local folder of <split>.jsonl/.json/.csv/.parquet files, or a single file.
  c.data.path = ""
  c.data.text_column = "text"
  # Second text of a sentence pair (NLI, paraphrase); "" for single sentences.
  c.data.text_pair_column = ""
  c.data.label_column = "label"
  c.data.train_split = "train"
  # Longest tokenised sequence; longer ones are truncated (the count is logged).
  c.data.max_length = 128
  # Padded lengths XLA compiles for (max_length is always one). Empty: pick
  # `num_buckets` lengths from the training set's length quantiles; 1 bucket
  # pads everything to max_length.
  c.data.bucket_lengths = ()
  c.data.num_buckets = 4
  # Instruction data (model.task="causal_lm"): records {instruction, input,
  # output} or {input, output}; the loss is on the output (+ EOS) only.
  c.data.instruction_column = "instruction"
  c.data.input_column = "input"
  c.data.output_column = "output"
  # "alpaca": the Alpaca prompt ("### Instruction: ... ### Response:");
  # "chat": the tokenizer's chat template (a user turn + generation prompt);
  # "raw": preference prompts as they are (`ftjax.data.preference`).
  c.data.template = "alpaca"
  # Pack several examples into each max_length row (segment ids keep them
  # apart; positions restart); False pads each example to its bucket.
  c.data.packing = False
  # Multi-task mixing: ((name, path, weight), ...) read instead of data.path;
  # training samples task t with probability weight_t / sum(weights).
  c.data.mixture = ()
  # Preference pairs (`ftjax.data.preference`): {prompt, chosen, rejected}
  # records (or chat messages); a pair too long for max_length first loses the
  # start of its prompt, down to `min_prompt_tokens`.
  c.data.prompt_column = "prompt"
  c.data.chosen_column = "chosen"
  c.data.rejected_column = "rejected"
  c.data.min_prompt_tokens = 64

  c.strategy = ml_collections.ConfigDict()
  # "full" | "freeze" (embeddings + the first `freeze_layers` layers) |
  # "head_only" (only the classifier) | "lora" (adapters + classifier).
  c.strategy.name = "full"
  c.strategy.freeze_layers = 0
  c.strategy.freeze_embeddings = True
  # head_only only: compute the frozen encoder's features once (inference
  # mode, cached under <workdir>/feature_cache/) and train the head on them.
  c.strategy.cache_features = False
  # Extra (regex, "trainable"|"frozen") rules over parameter paths, tried
  # before the strategy's own; first match wins.
  c.strategy.rules = ()
  # PEFT methods stacked on the model, in order (`ftjax.peft.adapter`
  # registry names, e.g. ("lora",)); strategy.name="lora" implies ("lora",).
  # Adapter parameters are trainable; the rest follows strategy.name.
  c.strategy.adapters = ()
  c.strategy.lora = ml_collections.ConfigDict()
  c.strategy.lora.rank = 8
  c.strategy.lora.alpha = 16.0
  c.strategy.lora.dropout = 0.0
  # Regexes over module paths, e.g. "encoder/layers/3/attention/query" or
  # "decoder/layers/3/attention/query" (q_proj); "all-linear": every
  # projection of every layer.
  c.strategy.lora.targets = (r".*/attention/(query|value)",)
  # rsLoRA: scale alpha/sqrt(rank) instead of alpha/rank.
  c.strategy.lora.rslora = False
  # DoRA: magnitude vector times the normalised direction W + scale*A*B.
  c.strategy.lora.dora = False
  # LoRA+: B's learning rate is lr_ratio times A's (and the rest's).
  c.strategy.lora.lr_ratio = 1.0

  # The other PEFT methods' groups, from their modules (`ftjax.peft`):
  # strategy.quant, strategy.ia3, strategy.prompt, ...
  from ftjax.peft import adapter  # pylint: disable=g-import-not-at-top
  for name, defaults in adapter.config_groups().items():
    c.strategy[name] = defaults()

  c.optimizer = ml_collections.ConfigDict()
  # AdamW with decoupled weight decay; no decay on biases, norms, embeddings.
  c.optimizer.learning_rate = 5e-5
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  # Linear warmup from 0, as steps or as a fraction of training (set at most one).
  c.optimizer.warmup_steps = config_dict.placeholder(int)
  c.optimizer.warmup_fraction = config_dict.placeholder(float)
  # Then linear decay to this learning rate at the last step.
  c.optimizer.end_learning_rate = 0.0
  # Clip the global gradient norm (0: no clipping).
  c.optimizer.grad_clip_norm = 1.0
  # Split each batch into this many micro-batches, summed inside one step.
  c.optimizer.accumulation_steps = 1

  c.training = ml_collections.ConfigDict()
  # Global batch size (examples per optimizer step, over all devices and hosts).
  c.training.batch_size = 32
  # Training length in epochs; `num_steps`, when set, wins.
  c.training.num_epochs = 3.0
  c.training.num_steps = config_dict.placeholder(int)
  c.training.log_every_steps = 50

  c.eval = ml_collections.ConfigDict()
  c.eval.splits = ("validation", "test")
  # Evaluate every N steps (None: once per epoch) and always at the end.
  c.eval.every_steps = config_dict.placeholder(int)
  c.eval.batch_size = 128
  # "<split>/<metric>" for keep-best checkpoints and early stopping.
  c.eval.metric = "validation/accuracy"
  c.eval.mode = "max"
  # Stop after this many evaluations without improvement (0: never).
  c.eval.early_stopping_patience = 0
  # Evaluate (and log) once before the first step too, e.g. for a
  # before/after perplexity.
  c.eval.at_start = False
  # At most this many examples of each eval split (per task); 0: all.
  c.eval.max_examples = 0
  # causal_lm: greedy generation on the first N examples of each eval split
  # (per task) for exact match of the final answer; 0: no generation.
  c.eval.generate_examples = 0
  c.eval.max_new_tokens = 256
  # The final answer in a response: group 1 of this regex (GSM8K's "#### 72");
  # a response without it is compared whole.
  c.eval.answer_regex = r"####\s*(.+)"
  # Predictions written to the log and <workdir>/samples.jsonl per evaluation.
  c.eval.num_samples = 4

  c.checkpoint = ml_collections.ConfigDict()
  # Save every N steps (None: at every evaluation) and at the end.
  c.checkpoint.every_steps = config_dict.placeholder(int)
  c.checkpoint.max_to_keep = 2
  # Also keep the best checkpoint by eval.metric.
  c.checkpoint.keep_best = True
  # Verify a checkpoint against its manifest (sizes + blake2b of every file)
  # before restoring it; a damaged one is moved aside and the previous one
  # used. False skips the check (very large checkpoints) and logs that it did.
  c.checkpoint.verify = True

  c.mesh = ml_collections.ConfigDict()
  # Devices along each mesh axis; -1 takes the remaining devices.
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  # Logical axis name -> mesh axis (or axes); unlisted names are replicated.
  c.mesh.rules = (
      ("batch", ("data", "fsdp")),
      # The (batch, length, embed) hidden state between layers.
      ("activation_batch", ("data", "fsdp")),
      ("embed", "fsdp"),
      ("vocab", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("mlp", "tensor"),
  )

  # Start from another run's fine-tuned weights (intermediate-task transfer):
  # its workdir (latest checkpoint) or <workdir>/checkpoints/<step>. A head
  # of another shape (another number of labels) is re-initialised.
  c.init_from = ""

  c.seed = 0
  return c


def override(config: ml_collections.ConfigDict, values: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys, as --config.a.b=v does: override(c, {"optimizer.learning_rate": 1e-4})."""
  for dotted, value in values.items():
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
      node = node[key]
    node[leaf] = value
  return config


def shared_data_dir() -> str:
  """Folder of the shared datasets: $FTJAX_DATA_DIR, or `../shared/data` beside the repo."""
  env = os.environ.get("FTJAX_DATA_DIR")
  if env:
    return env
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(os.path.dirname(repo), "shared", "data")


def _check_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict,
                prefix: str = "") -> None:
  for key in config.keys():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"unknown config key {name!r}; expected one of "
                        f"{', '.join(prefix + k for k in sorted(schema.keys()))}")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key {name!r} must be a group of keys, got {value!r}")
      _check_keys(value, default, name + ".")
      continue
    expected = schema.get_type(key)
    if value is None:
      if not _is_placeholder(schema, key):
        raise ConfigError(f"config key {name!r} must be set (a {expected.__name__})")
      continue
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
      continue
    if not isinstance(value, expected) or (isinstance(value, bool) and expected is not bool):
      raise ConfigError(f"config key {name!r} is {value!r} ({type(value).__name__}); "
                        f"expected a {expected.__name__}")


def _is_placeholder(schema: ml_collections.ConfigDict, key: str) -> bool:
  """Was the schema's default `config_dict.placeholder(type)` (None allowed)?"""
  return schema[key] is None


def _check_values(c: ml_collections.ConfigDict, objective) -> None:
  def require(ok: bool, key: str, value, expected: str):
    if not ok:
      raise ConfigError(f"config key {key!r} is {value!r}; expected {expected}")

  require(c.model.task in TASKS, "model.task", c.model.task, f"one of {TASKS}")
  require(c.model.pooling in POOLINGS, "model.pooling", c.model.pooling, f"one of {POOLINGS}")
  require(c.model.dtype in DTYPES, "model.dtype", c.model.dtype, f"one of {DTYPES}")
  require(c.model.remat in REMAT_CHOICES, "model.remat", c.model.remat,
          f"one of {REMAT_CHOICES}")
  require(all(isinstance(i, int) and i >= 0 for i in c.model.layers)
          and list(c.model.layers) == sorted(set(c.model.layers)), "model.layers",
          c.model.layers, "increasing layer indices >= 0 (or (): every layer)")
  require(c.model.num_labels is None or c.model.num_labels >= 1, "model.num_labels",
          c.model.num_labels, "a positive number of classes")
  require(c.data.source in SOURCES, "data.source", c.data.source, f"one of {SOURCES}")
  require(c.data.max_length >= 2, "data.max_length", c.data.max_length, "at least 2 tokens")
  require(c.data.num_buckets >= 1, "data.num_buckets", c.data.num_buckets, "at least 1")
  require(all(isinstance(n, int) and n >= 1 for n in c.data.bucket_lengths),
          "data.bucket_lengths", c.data.bucket_lengths, "positive lengths")
  require(c.data.template in TEMPLATES, "data.template", c.data.template, f"one of {TEMPLATES}")
  for entry in c.data.mixture:
    require(len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], str)
            and isinstance(entry[2], (int, float)) and entry[2] > 0, "data.mixture", entry,
            "(name, path, weight > 0) triples")
  names = [entry[0] for entry in c.data.mixture]
  require(len(set(names)) == len(names), "data.mixture", names, "distinct task names")
  require(not (c.data.mixture and c.data.path), "data.path", c.data.path,
          "empty when data.mixture names the tasks' paths")
  from ftjax.peft import adapter  # pylint: disable=g-import-not-at-top
  strategies = STRATEGIES + adapter.strategy_names()
  require(c.strategy.name in strategies, "strategy.name", c.strategy.name,
          f"one of {strategies}")
  require(c.strategy.freeze_layers >= 0, "strategy.freeze_layers", c.strategy.freeze_layers,
          "a number of layers >= 0")
  require(not c.strategy.cache_features or c.strategy.name == "head_only",
          "strategy.cache_features", c.strategy.cache_features,
          f"False with strategy.name={c.strategy.name!r} (features are cached only for "
          f"head_only, whose encoder is frozen)")
  require(all(len(r) == 2 and r[1] in ("trainable", "frozen") for r in c.strategy.rules),
          "strategy.rules", c.strategy.rules, '(regex, "trainable"|"frozen") pairs')
  require(all(isinstance(a, str) and a in adapter.registered() for a in c.strategy.adapters)
          and len(set(c.strategy.adapters)) == len(c.strategy.adapters), "strategy.adapters",
          c.strategy.adapters, f"distinct names of {adapter.registered()}")
  require(not (c.strategy.name == "head_only" and c.strategy.adapters), "strategy.adapters",
          c.strategy.adapters, "() with strategy.name='head_only' (its encoder is frozen and "
          "runs without dropout; use strategy.name='freeze' to stack adapters on a frozen "
          "model)")
  require(c.strategy.lora.rank >= 1, "strategy.lora.rank", c.strategy.lora.rank,
          "a LoRA rank >= 1")
  require(c.strategy.lora.alpha > 0, "strategy.lora.alpha", c.strategy.lora.alpha, "> 0")
  require(0 <= c.strategy.lora.dropout < 1, "strategy.lora.dropout", c.strategy.lora.dropout,
          "a probability in [0, 1)")
  require(len(c.strategy.lora.targets) >= 1, "strategy.lora.targets", c.strategy.lora.targets,
          "at least one regex")
  require(c.strategy.lora.lr_ratio > 0, "strategy.lora.lr_ratio", c.strategy.lora.lr_ratio,
          "> 0 (LoRA+: B's learning rate over A's; 1 is plain LoRA)")
  # Each adapter checks its own group (`strategy.<name>`) when it is built.
  adapter.from_config(c.strategy)
  o = c.optimizer
  require(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a learning rate > 0")
  require(o.end_learning_rate >= 0, "optimizer.end_learning_rate", o.end_learning_rate, ">= 0")
  require(0 <= o.b1 < 1, "optimizer.b1", o.b1, "a value in [0, 1)")
  require(0 <= o.b2 < 1, "optimizer.b2", o.b2, "a value in [0, 1)")
  require(o.eps > 0, "optimizer.eps", o.eps, "> 0")
  require(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, ">= 0")
  require(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm,
          ">= 0 (0: no clipping)")
  require(o.accumulation_steps >= 1, "optimizer.accumulation_steps", o.accumulation_steps,
          ">= 1")
  require(o.warmup_steps is None or o.warmup_fraction is None, "optimizer.warmup_steps",
          o.warmup_steps, "unset when optimizer.warmup_fraction is set (set one of them)")
  require(o.warmup_steps is None or o.warmup_steps >= 0, "optimizer.warmup_steps",
          o.warmup_steps, ">= 0")
  require(o.warmup_fraction is None or 0 <= o.warmup_fraction < 1,
          "optimizer.warmup_fraction", o.warmup_fraction, "a fraction in [0, 1)")
  t = c.training
  require(t.batch_size >= 1, "training.batch_size", t.batch_size,
          "a positive number of examples")
  require(t.batch_size % o.accumulation_steps == 0, "training.batch_size", t.batch_size,
          f"a multiple of optimizer.accumulation_steps={o.accumulation_steps}")
  require(t.num_epochs > 0, "training.num_epochs", t.num_epochs, "> 0")
  require(t.num_steps is None or t.num_steps >= 1, "training.num_steps", t.num_steps, ">= 1")
  require(t.log_every_steps >= 1, "training.log_every_steps", t.log_every_steps, ">= 1")
  require(c.eval.every_steps is None or c.eval.every_steps >= 1, "eval.every_steps",
          c.eval.every_steps, ">= 1 (or None: once per epoch)")
  require(c.eval.batch_size >= 1, "eval.batch_size", c.eval.batch_size, ">= 1")
  require(c.eval.mode in ("max", "min"), "eval.mode", c.eval.mode, "'max' or 'min'")
  split, _, metric = c.eval.metric.partition("/")
  metric = metric.rsplit("/", 1)[-1]  # "<split>/<task>/<metric>" for one task of a mixture
  metrics = objective.metrics_for(c) if objective is not None else ()
  require(objective is None or not c.eval.splits
          or (split in c.eval.splits and metric in metrics),
          "eval.metric", c.eval.metric,
          f"'<split>/<metric>' with a split of eval.splits {tuple(c.eval.splits)} and a metric "
          f"of {metrics}")
  require(c.eval.max_examples >= 0, "eval.max_examples", c.eval.max_examples, ">= 0 (0: all)")
  require(c.eval.generate_examples >= 0, "eval.generate_examples", c.eval.generate_examples,
          ">= 0 (0: no generation)")
  require(c.eval.max_new_tokens >= 1, "eval.max_new_tokens", c.eval.max_new_tokens, ">= 1")
  require(c.eval.num_samples >= 0, "eval.num_samples", c.eval.num_samples, ">= 0")
  try:
    re.compile(c.eval.answer_regex)
  except re.error as e:
    require(False, "eval.answer_regex", c.eval.answer_regex, f"a valid regex ({e})")
  require(c.eval.early_stopping_patience >= 0, "eval.early_stopping_patience",
          c.eval.early_stopping_patience, ">= 0 (0: off)")
  require(c.checkpoint.every_steps is None or c.checkpoint.every_steps >= 1,
          "checkpoint.every_steps", c.checkpoint.every_steps, ">= 1 (or None)")
  require(c.checkpoint.max_to_keep >= 1, "checkpoint.max_to_keep", c.checkpoint.max_to_keep,
          ">= 1")
  for axis in MESH_AXES:
    size = c.mesh[axis]
    require(size == -1 or size >= 1, f"mesh.{axis}", size, "a device count >= 1, or -1")


def objective_class(config: ml_collections.ConfigDict):
  """The run's `Objective` class; None for a bare model (model.task encoder/decoder, no
  objective.name: probe runs), which cannot train."""
  from ftjax import objectives  # pylint: disable=g-import-not-at-top
  module = config.objective.get("module", "")
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ConfigError(f"config key 'objective.module' is {module!r}, which does not import "
                        f"({e}); expected the module that registers objective "
                        f"{config.objective.name!r}") from None
  name = objectives.name_of(config)
  if not config.objective.name and name not in objectives.names():
    return None
  return objectives.get(name)


def set_objective(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config.objective.name = name` with the objective's own keys (their defaults) added,
  so a config file's `--config.objective.<key>=` overrides find them."""
  config.objective.name = name
  _with_objective_group(config, objective_class(config))
  return config


def _with_objective_group(config: ml_collections.ConfigDict, objective) -> None:
  """Adds the objective's own keys (its defaults) to `config.objective` where missing."""
  if objective is None:
    return
  with config.unlocked():
    for key, value in objective.config().items():
      if key not in config.objective:
        config.objective[key] = value


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks keys, types and values against the schema; returns the config.

  The schema is `default_config()` plus the objective's group
  (`Objective.config()`), whose defaults are filled into `config`.
  """
  if not isinstance(config.get("objective"), ml_collections.ConfigDict):
    _check_keys(config, default_config())  # Names the missing/bad group.
  objective = objective_class(config)
  schema = default_config()
  _with_objective_group(schema, objective)
  _with_objective_group(config, objective)
  _check_keys(config, schema)
  _check_values(config, objective)
  if objective is not None:
    head = objective.head_for(config)
    if config.model.task != head:
      raise ConfigError(f"config key 'model.task' is {config.model.task!r}; expected "
                        f"{head!r}, the head objective {objective.name!r} trains")
    if not objective.__module__.startswith("ftjax.") and not config.objective.module:
      with config.unlocked():
        config.objective.module = objective.__module__
    objective.check_config(config)
  return config


class Steps(NamedTuple):
  """Every duration of a run, in optimizer steps."""
  total: int
  warmup: int
  eval_every: int
  checkpoint_every: int
  steps_per_epoch: int


def resolve_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> Steps:
  """Epochs, fractions and `None` defaults -> steps. The loop only sees steps."""
  if steps_per_epoch < 1:
    raise ConfigError(f"training.batch_size={config.training.batch_size} is larger than the "
                      f"training split; expected at least one full batch per epoch")
  t, o = config.training, config.optimizer
  total = (t.num_steps if t.num_steps is not None
           else max(1, round(t.num_epochs * steps_per_epoch)))
  if o.warmup_steps is not None:
    warmup = o.warmup_steps
  elif o.warmup_fraction is not None:
    warmup = int(o.warmup_fraction * total)
  else:
    warmup = 0
  if warmup >= total:
    # Only warmup_steps can get here: validate keeps warmup_fraction below 1.
    raise ConfigError(f"optimizer.warmup_steps={warmup} but training has {total} steps; "
                      f"expected fewer warmup steps than training steps")
  eval_every = config.eval.every_steps or steps_per_epoch
  checkpoint_every = config.checkpoint.every_steps or eval_every
  return Steps(total, warmup, eval_every, checkpoint_every, steps_per_epoch)


def save_run_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """`workdir/config.json`: the resolved config that `load_run_config` reads back."""
  from ftjax import files  # pylint: disable=g-import-not-at-top
  files.atomic_write_text(pathlib.Path(workdir) / "config.json",
                          config.to_json_best_effort(indent=2) + "\n")


def load_run_config(workdir: pathlib.Path, overrides: list[str]) -> ml_collections.ConfigDict:
  """A run's resolved config (`workdir/config.json`), with `key=value` overrides, validated."""
  path = workdir / "config.json"
  if not path.is_file():
    raise ConfigError(f"{workdir} has no config.json; expected the --workdir of a training run")
  config = default_config()
  saved = json.loads(path.read_text(encoding="utf-8"))
  config.objective.name = saved.get("objective", {}).get("name", "")
  config.objective.module = saved.get("objective", {}).get("module", "")
  _with_objective_group(config, objective_class(config))
  _update(config, saved)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise ConfigError(f"--set {item!r}: expected key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # A bare string such as a path.
    try:
      override(config, {key: value})
    except (AttributeError, KeyError, TypeError) as e:
      raise ConfigError(f"--set {item!r}: {e}") from None
  return validate(config)


def _update(config: ml_collections.ConfigDict, saved: dict) -> None:
  """Copies a saved config.json (lists where the schema has tuples) into `config`."""
  for key, value in saved.items():
    if key not in config:
      raise ConfigError(f"config.json has key {key!r} that this ftjax does not know")
    if isinstance(config[key], ml_collections.ConfigDict):
      _update(config[key], value)
    else:
      config[key] = _tuples(value) if isinstance(value, list) else value


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
