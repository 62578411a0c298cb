"""Reading dataset splits from local files through Hugging Face `datasets`.

`data.path` is a folder holding one file per split (`train.jsonl`,
`validation.jsonl`, ...; JSON Lines, JSON, CSV or Parquet) or a single file.
The shared datasets are read in place from `$FTJAX_DATA_DIR/<name>`.
"""

import pathlib

import datasets

from ftjax.errors import ConfigError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def split_file(path: str, split: str) -> pathlib.Path:
  """The file holding `split` under `data.path`."""
  if not path:
    raise ConfigError(
        "data.path is empty; pass --config.data.path=DIR (a folder of <split>.jsonl files, "
        "e.g. ../shared/data/rotten_tomatoes) or set FTJAX_DATA_DIR to the shared data folder")
  root = pathlib.Path(path).expanduser()
  if root.is_file():
    return root
  if not root.is_dir():
    raise ConfigError(f"data.path {path!r} does not exist; expected a folder of <split>.jsonl "
                      f"files or a single data file")
  for suffix in _BUILDERS:
    candidate = root / f"{split}{suffix}"
    if candidate.is_file():
      return candidate
  raise ConfigError(f"no file for split {split!r} in {path!r}; expected {split}.jsonl, "
                    f"{split}.json, {split}.csv or {split}.parquet")


def load_split(path: str, split: str) -> datasets.Dataset:
  file = split_file(path, split)
  if file.suffix not in _BUILDERS:
    raise ConfigError(f"data file {str(file)!r} has suffix {file.suffix!r}; expected one of "
                      f"{', '.join(_BUILDERS)}")
  return datasets.load_dataset(_BUILDERS[file.suffix], data_files={split: str(file)},
                               split=split)
