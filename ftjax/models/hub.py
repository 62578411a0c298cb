"""Finding a model's files (a local folder or a Hugging Face hub id) and reading them.

Weights are read from safetensors (one file, or shards listed in
`model.safetensors.index.json`). `pytorch_model.bin` is a pickle, which can
run arbitrary code when loaded, so it is refused unless the caller opts in;
then it is loaded with `torch.load(weights_only=True)`. Remote code is never
run.
"""

import json
import os
import pathlib
import re

from safetensors import safe_open

from ftjax.errors import CheckpointError
from ftjax.models.keymap import TensorSource

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
# What a snapshot download fetches: config, weights and tokenizer files.
_HUB_PATTERNS = [CONFIG, "*.safetensors", SAFETENSORS_INDEX, "tokenizer*", "vocab*",
                 "merges.txt", "special_tokens_map.json", "*.model", "generation_config.json"]
_HUB_FAILURES = {
    "LocalEntryNotFoundError": "the hub is unreachable and it is not in the local cache",
    "RepositoryNotFoundError": "no such repository, or it is private",
    "GatedRepoError": "the repository is gated: log in with `hf auth login` first",
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def resolve(name_or_path: str) -> pathlib.Path:
  """A local folder holding the model's files.

  Order: an existing local path; else a hub id, taken from the local Hugging
  Face cache or downloaded (huggingface_hub honours HF_HUB_OFFLINE and
  HF_HOME). Fails with one line saying what was looked for.
  """
  path = pathlib.Path(name_or_path).expanduser()
  if path.exists():
    if not path.is_dir():
      raise CheckpointError(
          f"model path {name_or_path!r} is a file but not a GGUF file; expected a folder holding "
          f"config.json and model.safetensors, a .gguf file, or a Hugging Face hub id")
    return path
  if not _HUB_ID.fullmatch(name_or_path) or name_or_path.startswith((".", "~")):
    raise CheckpointError(f"model folder {name_or_path!r} does not exist")
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(name_or_path,
                                                          allow_patterns=_HUB_PATTERNS))
  except Exception as e:  # pylint: disable=broad-except
    # Offline, no cache, unknown repo, gated repo, network down: all end here.
    reason = _HUB_FAILURES.get(type(e).__name__, type(e).__name__)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
      reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
    raise CheckpointError(
        f"model {name_or_path!r} is not a local folder and could not be fetched from the "
        f"Hugging Face hub ({reason}); download it "
        f"where the hub is reachable (`hf download {name_or_path} --local-dir DIR`) and pass "
        f"the folder, e.g. --config.model.name_or_path=DIR") from None


def read_config(folder: pathlib.Path) -> dict:
  path = folder / CONFIG
  if not path.is_file():
    raise CheckpointError(
        f"{folder} has no config.json; expected a Hugging Face model folder "
        f"(config.json + model.safetensors)")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None


class _SafetensorsSource(TensorSource):

  def __init__(self, files: list[pathlib.Path]):
    self._handles = {}
    for file in files:
      if not file.is_file():
        raise CheckpointError(f"weight file {file} listed in {SAFETENSORS_INDEX} does not exist")
      handle = safe_open(str(file), framework="numpy")
      for name in handle.keys():
        self._handles[name] = handle

  def __getitem__(self, name):
    return self._handles[name].get_tensor(name)

  def __iter__(self):
    return iter(self._handles)

  def __len__(self):
    return len(self._handles)

  def shape(self, name):
    return tuple(self._handles[name].get_slice(name).get_shape())


class _PickleSource(TensorSource):

  def __init__(self, file: pathlib.Path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise CheckpointError(f"loading {file} needs PyTorch; install torch, or convert the "
                            f"checkpoint to safetensors") from None
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    self._arrays = {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy()
                    for k, v in state.items()}

  def __getitem__(self, name):
    return self._arrays[name]

  def __iter__(self):
    return iter(self._arrays)

  def __len__(self):
    return len(self._arrays)

  def shape(self, name):
    return self._arrays[name].shape


def open_weights(folder: pathlib.Path, *, allow_pickle: bool = False) -> TensorSource:
  """The checkpoint tensors in `folder`, read lazily."""
  if (folder / SAFETENSORS).is_file():
    return _SafetensorsSource([folder / SAFETENSORS])
  if (folder / SAFETENSORS_INDEX).is_file():
    index = json.loads((folder / SAFETENSORS_INDEX).read_text(encoding="utf-8"))
    files = sorted(set(index["weight_map"].values()))
    return _SafetensorsSource([folder / f for f in files])
  if (folder / PICKLE).is_file():
    if not allow_pickle:
      raise CheckpointError(
          f"{folder} holds only {PICKLE}, a pickle that can run code when loaded; convert it "
          f"to safetensors, or pass --config.model.allow_pickle=True to load it with "
          f"torch.load(weights_only=True)")
    return _PickleSource(folder / PICKLE)
  raise CheckpointError(
      f"{folder} has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PICKLE}")
