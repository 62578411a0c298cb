"""Feature caching for head-only training (the feature-based approach).

With the whole encoder frozen, what the classification head reads (BERT's
pooler output, the first token's or the mean hidden state: see
`model.pooling`) is a fixed function of each example. Head-only training then
needs the encoder once per example, not once per step: `features` runs it in
inference mode over a split and returns an (examples, embed) float32 array;
the train step feeds rows of it to the head (`model.apply(..., method="classify")`),
so an epoch costs a few small matmuls instead of a forward pass.

The arrays are kept in memory and, for resumed or repeated runs, on disk at
`<cache_dir>/<key>.npy`, where the key hashes everything that determines
them: the model (name or path, the weight files' sizes and mtimes for a local
folder, `init_from`), `pooling`, `dtype`, the split's token ids (so
`max_length`, the tokenizer and the data are all in it) and the split name.
A changed input is a new key, never a stale hit. Files are written
atomically (temporary name, then rename), so an interrupted write leaves no
half cache.

Encoder dropout is off when features are cached (inference mode): the
classifier's own dropout still applies in training.
"""

import hashlib
import json
import pathlib
import time
import zlib

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ftjax import files, models, sharding
from ftjax.data import pipeline
from ftjax.peft import partition


def cache_key(config: ml_collections.ConfigDict, split_name: str,
              split: pipeline.TokenizedSplit) -> str:
  """A hex digest of everything that determines a split's features."""
  tokens = 0
  for ids in split.input_ids:
    tokens = zlib.crc32(ids.tobytes(), tokens)
  if split.token_type_ids is not None:
    for types in split.token_type_ids:
      tokens = zlib.crc32(types.tobytes(), tokens)
  identity = {
      "model": config.model.name_or_path, "weights": _weight_files(config.model.name_or_path),
      "init_from": config.init_from, "pooling": config.model.pooling,
      "dtype": config.model.dtype, "split": split_name, "num_examples": len(split),
      "tokens": tokens, "lengths": zlib.crc32(split.lengths.tobytes()),
  }
  return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _weight_files(name_or_path: str) -> list:
  """(name, size, mtime) of a local folder's weight files: a rewritten checkpoint is a new key."""
  folder = pathlib.Path(name_or_path)
  if not folder.is_dir():
    return []
  return [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
          for p in sorted(folder.iterdir()) if p.suffix in (".safetensors", ".bin", ".json")]


def feature_step(model: models.Model, trainable, frozen, *, config: ml_collections.ConfigDict,
                 mesh: jax.sharding.Mesh):
  """The jitted `(trainable, frozen, batch) -> (features, index, weights)`, built once per run.

  Runs the encoder in inference mode, sharded like evaluation; outputs are
  replicated so every host gets every row. One compile per bucket length,
  shared by all splits.
  """
  batch_sharding = sharding.batch_sharding(config, mesh)

  def fn(trainable, frozen, batch):
    params = partition.merge(trainable, frozen)
    feats = model.apply(params, batch["input_ids"], batch["attention_mask"], method="features",
                        **pipeline.token_types(batch))
    return feats.astype(np.float32), batch["index"], batch["weights"]

  shardings = jax.tree.map(lambda x: x.sharding, (trainable, frozen))
  return jax.jit(fn, in_shardings=(*shardings, batch_sharding),
                 out_shardings=sharding.replicated(mesh))


def features(step, trainable, frozen, split: pipeline.TokenizedSplit, *,
             config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
             buckets: tuple[int, ...], pad_id: int) -> np.ndarray:
  """(examples, embed) float32: the head's input for every example of `split`.

  `step` is `feature_step(...)`; batches are eval batches (every example
  once, bucketed).
  """
  batch_sharding = sharding.batch_sharding(config, mesh)
  outputs = [step(trainable, frozen, sharding.put_batch(batch, batch_sharding))
             for batch in pipeline.eval_batches(
                 split, global_batch_size=config.eval.batch_size, buckets=buckets,
                 process_index=jax.process_index(), process_count=jax.process_count(),
                 pad_id=pad_id)]
  outputs = jax.device_get(outputs)
  out = np.zeros((len(split), outputs[0][0].shape[-1]), np.float32)
  filled = np.zeros(len(split), bool)
  for feats, index, weights in outputs:
    real = weights > 0
    out[index[real]] = feats[real]
    filled[index[real]] = True
  assert filled.all(), f"{(~filled).sum()} examples got no features"
  return out


def load_or_compute(cache_dir: pathlib.Path | None, key: str, compute):
  """The cached array (or dict of arrays) for `key`, or `compute()` saved there; and
  whether it was a hit.

  One array is `<key>.npy`, a dict of arrays `<key>.npz` (read without
  pickle). Every host must take the same branch (computing is a collective),
  so a multi-host run reads the cache only if every host sees the file.
  """
  paths = [] if cache_dir is None else [pathlib.Path(cache_dir) / f"{key}{suffix}"
                                        for suffix in (".npy", ".npz")]
  found = next((p for p in paths if p.is_file()), None)
  exists = found is not None
  if jax.process_count() > 1:
    exists = bool(np.all(multihost_utils.process_allgather(np.asarray(exists))))
  if exists:
    if found.suffix == ".npz":
      with np.load(found, allow_pickle=False) as saved:
        return {name: saved[name] for name in saved.files}, True
    return np.load(found, allow_pickle=False), True
  started = time.perf_counter()
  value = compute()
  shapes = ({k: v.shape for k, v in value.items()} if isinstance(value, dict) else value.shape)
  logging.info("computed %s in %.1f s", shapes, time.perf_counter() - started)
  if paths and jax.process_index() == 0:
    path = paths[1] if isinstance(value, dict) else paths[0]
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):  # A file object: np.save would add ".npy" to a name.
      with open(tmp, "wb") as f:
        if isinstance(value, dict):
          np.savez(f, **value)
        else:
          np.save(f, value, allow_pickle=False)

    files.atomic_write(path, write)
  return value, False
