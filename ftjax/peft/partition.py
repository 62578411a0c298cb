"""Which parameters train: a list of (regex, "trainable"|"frozen") rules.

The partition is data (big_vision's `_split_frozen`): rules are tried in
order over flat parameter paths such as `encoder/layers/3/attention/query/kernel`,
the first `re.fullmatch` wins, and every parameter must be covered; an
uncovered path is an error that names it. Strategies are only rule
generators, so `freeze_layers=K` is sugar for a regex.

The train state keeps the two sides apart (`split`/`merge`): the optimizer
only ever sees the trainable side (so frozen leaves have no optimizer state
and no update) and the train step differentiates only that side (so no
backward pass runs through a frozen prefix and no weight gradients are
formed for frozen kernels).
"""

import itertools
import math
import re
from collections.abc import Mapping, Sequence

import jax
import ml_collections

from ftjax.errors import ConfigError
from ftjax.models import keymap
from ftjax.peft import adapter as adapter_lib

TRAINABLE, FROZEN = "trainable", "frozen"
Rules = Sequence[tuple[str, str]]

# Task heads, trained by every strategy (the classifier is new for a new task).
HEAD = r"classifier/.*"
HEAD_PREFIXES = ("classifier/",)


def strategy_rules(strategy: ml_collections.ConfigDict, *, num_layers: int) -> list[tuple[str, str]]:
  """The rules a strategy stands for, after the user's own `strategy.rules`.

  Order of precedence: the user's rules, then the rules of the strategy's
  adapters (`adapter.from_config`: LoRA's factors, ...), then the strategy's
  own, so a frozen layer range or a (".*", frozen) catch-all never freezes the
  adapters a run asked for.
  """
  rules = [tuple(rule) for rule in strategy.rules]
  for adapter in adapter_lib.from_config(strategy):
    rules += [tuple(rule) for rule in adapter.rules()]
  name = strategy.name
  if name == "full":
    rules.append((".*", TRAINABLE))
  elif name == "freeze":
    k = strategy.freeze_layers
    if k > num_layers:
      raise ConfigError(f"strategy.freeze_layers={k} but the model has {num_layers} layers; "
                        f"expected 0..{num_layers}")
    if strategy.freeze_embeddings:
      rules.append((r"embeddings/.*", FROZEN))
    if k:
      # Encoders keep their layers under encoder/, decoders under decoder/.
      rules.append((rf"(encoder|decoder)/layers/({'|'.join(map(str, range(k)))})/.*", FROZEN))
    rules.append((".*", TRAINABLE))
  elif name == "head_only":
    rules += [(HEAD, TRAINABLE), (".*", FROZEN)]
  elif name in adapter_lib.strategy_names():
    # "lora", "ia3", ...: the adapters' rules came first; as head_only, plus those.
    rules += [(HEAD, TRAINABLE), (".*", FROZEN)]
  else:
    raise ConfigError(f"strategy.name={name!r}; expected one of full, freeze, head_only, "
                      f"{', '.join(adapter_lib.strategy_names())}")
  return rules


def labels(paths: Sequence[str], rules: Rules) -> dict[str, str]:
  """Flat path -> "trainable"|"frozen" by the first matching rule."""
  compiled = []
  for pattern, label in rules:
    if label not in (TRAINABLE, FROZEN):
      raise ConfigError(f"partition rule ({pattern!r}, {label!r}): expected 'trainable' or "
                        f"'frozen'")
    try:
      compiled.append((re.compile(pattern), label))
    except re.error as e:
      raise ConfigError(f"partition rule regex {pattern!r} is invalid: {e}") from None
  out = {}
  for path in paths:
    label = next((lab for regex, lab in compiled if regex.fullmatch(path)), None)
    if label is None:
      raise ConfigError(f"parameter {path!r} is not covered by any partition rule; every "
                        f"parameter must match one (add a catch-all such as ('.*', 'frozen'))")
    out[path] = label
  return out


_LAYER_PATH = re.compile(r"(?P<stack>.*/layers)/(?P<index>\d+)/(?P<rest>.*)")


def layer_groups(path_labels: Mapping[str, str]) -> tuple[tuple[int, int], ...]:
  """Ranges [start, stop) of consecutive layers that hold the same parameters, labelled alike.

  What `model.scan_layers` scans as one stack: with `freeze_layers=K` the
  frozen layers 0..K-1 and the trainable rest are two ranges, so the frozen
  stack stays out of the backward pass; with LoRA on some layers only, those
  layers are their own range.
  """
  signatures: dict[int, set] = {}
  for path, label in path_labels.items():
    match = _LAYER_PATH.fullmatch(path)
    if match:
      signatures.setdefault(int(match["index"]), set()).add((match["stack"], match["rest"],
                                                              label))
  runs = [list(run) for _, run in itertools.groupby(sorted(signatures), signatures.get)]
  return tuple((run[0], run[-1] + 1) for run in runs)


def split(params: Mapping, path_labels: Mapping[str, str]) -> tuple[dict, dict]:
  """Nested params -> (trainable, frozen), each a nested dict of its own leaves."""
  flat = keymap.flatten(params)
  sides = {TRAINABLE: {}, FROZEN: {}}
  for path, value in flat.items():
    sides[path_labels[path]][path] = value
  return _nest(sides[TRAINABLE]), _nest(sides[FROZEN])


def merge(trainable: Mapping, frozen: Mapping) -> dict:
  """Inverse of `split`: one nested tree (inside jit this is free)."""
  out: dict = {}
  for side in (frozen, trainable):
    _deep_update(out, side)
  return out


def count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _nest(flat: Mapping[str, object]) -> dict:
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(_key(key), {})
    node[_key(leaf)] = value
  return out


def _key(segment: str):
  # Layer indices are ints in the NNX pure-dict tree (nnx.List).
  return int(segment) if segment.isdigit() else segment


def _deep_update(dst: dict, src: Mapping) -> None:
  for key, value in src.items():
    if isinstance(value, Mapping):
      _deep_update(dst.setdefault(key, {}), value)
    else:
      dst[key] = value
