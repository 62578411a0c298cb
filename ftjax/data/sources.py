"""Reading one dataset split as a Hugging Face `datasets.Dataset`.

`config.data.source` says where the records come from:

- "files": `data.path` is a folder holding one file per split (`train.jsonl`,
  `validation.jsonl`, ...; JSON Lines, JSON, CSV or Parquet) or a single file.
  The shared datasets are read in place from `$FTJAX_DATA_DIR/<name>`.
- "hf": `data.name` is a hub dataset id, read with `datasets.load_dataset`.
- "tfds": `data.name` is a TFDS name, read through `tfds.data_source` (random
  access, no TensorFlow graph); `data.path`, if set, is the TFDS data_dir.

Every source ends as the same `datasets.Dataset`, checked here for what every
later stage relies on: the configured columns exist and the split is not
empty. Anything the user can get wrong raises `ConfigError` with one line.
"""

import codecs
import json
import pathlib
from collections.abc import Sequence

import datasets
import ml_collections

from ftjax.config import SOURCES
from ftjax.errors import ConfigError

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Text formats are checked for UTF-8 before `datasets` reads them: pyarrow
# accepts invalid bytes and the error only surfaces when a row is read.
_TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
_FILES_HINT = "--config.data.source=files --config.data.path=DIR"


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


def load_split(data_config: ml_collections.ConfigDict, split: str, *,
               max_examples: int = 0) -> datasets.Dataset:
  """Reads `split` from the configured source and checks its columns.

  Args:
    data_config: `config.data`.
    split: "train", "validation", ...; for TFDS any split expression
      ("train[:10%]").
    max_examples: when positive, only the first `max_examples` examples.

  Returns:
    The split with at least the text, text-pair (if set) and label columns.
  """
  source = data_config.source
  if source == "files":
    dataset = _load_files(data_config.path, split)
  elif source == "hf":
    dataset = _load_hub(data_config.name, split)
  elif source == "tfds":
    dataset = _load_tfds(data_config, split)
  else:
    raise ConfigError(f"data.source is {source!r}; expected one of {SOURCES}")
  _check_columns(dataset.column_names, data_config, f"{source} split {split!r}")
  if len(dataset) == 0:
    raise ConfigError(f"split {split!r} of data source {source!r} is empty; "
                      f"expected at least one example")
  return _first(dataset, max_examples)


def load_records(path: str, split: str, data_config: ml_collections.ConfigDict, *,
                 max_examples: int = 0) -> datasets.Dataset:
  """A split of instruction records (one task's `path`) with its columns checked.

  `path` is a local folder or file ("files"), or a hub dataset id ("hf").
  Records need the output column and the instruction or the input column.
  With `max_examples` > 0, only the first `max_examples` records.
  """
  dataset, where = load_table(path, split, data_config, what="instruction data "
                              "(model.task='causal_lm')")
  columns = dataset.column_names
  if data_config.output_column not in columns:
    raise ConfigError(f"data.output_column {data_config.output_column!r} is not a column of "
                      f"the {where}; available columns: {', '.join(columns)}")
  if not {data_config.instruction_column, data_config.input_column} & set(columns):
    raise ConfigError(f"the {where} has neither data.instruction_column "
                      f"{data_config.instruction_column!r} nor data.input_column "
                      f"{data_config.input_column!r}; available columns: {', '.join(columns)}")
  return _first(dataset, max_examples)


def load_table(path: str, split: str, data_config: ml_collections.ConfigDict, *,
               what: str) -> tuple[datasets.Dataset, str]:
  """(records, where they came from) of a split of jsonl/json/csv/parquet files under
  `path` ("files") or of a hub dataset ("hf"); an empty split is an error. `what`
  names the data in errors."""
  source = data_config.source
  if source == "files":
    dataset = _load_files(path, split)
  elif source == "hf":
    dataset = _load_hub(path or data_config.name, split)
  else:
    raise ConfigError(f"data.source is {source!r}; {what} is read from 'files' or 'hf'")
  where = f"{source} split {split!r} of {path or data_config.name!r}"
  if len(dataset) == 0:
    raise ConfigError(f"the {where} is empty; expected at least one example")
  return dataset, where


def _first(dataset: datasets.Dataset, max_examples: int) -> datasets.Dataset:
  return dataset.select(range(min(max_examples, len(dataset)))) if max_examples else dataset


def check_strings(values: Sequence, what: str) -> Sequence:
  """`values` when every one is a string; else a one-line error naming the first that is not.

  `what` names the values in the error, e.g. "text column 'text'".
  """
  for i, value in enumerate(values):
    if not isinstance(value, str):
      raise ConfigError(f"{what} holds {value!r} ({type(value).__name__}) at example {i}; "
                        f"expected a string in every example")
  return values


def required_columns(data_config: ml_collections.ConfigDict) -> list[str]:
  """The columns ftjax reads: text, text pair (when set), label."""
  names = [data_config.text_column, data_config.text_pair_column, data_config.label_column]
  return [name for name in names if name]


def _check_columns(available: list[str], data_config: ml_collections.ConfigDict,
                   where: str) -> None:
  for key in ("text_column", "text_pair_column", "label_column"):
    name = data_config[key]
    if name and name not in available:
      raise ConfigError(f"data.{key} {name!r} is not a column of the {where}; available "
                        f"columns: {', '.join(available)}")


def _load_files(path: str, split: str) -> datasets.Dataset:
  file = split_file(path, split)
  if file.suffix not in _BUILDERS:
    raise ConfigError(f"data file {str(file)!r} has suffix {file.suffix!r}; expected one of "
                      f"{', '.join(_BUILDERS)}")
  if file.stat().st_size == 0:
    raise ConfigError(f"split {split!r} is empty: data file {str(file)!r} has no records; "
                      f"expected at least one example")
  if file.suffix in _TEXT_SUFFIXES:
    _check_utf8(file)
  try:
    return datasets.load_dataset(_BUILDERS[file.suffix], data_files={split: str(file)},
                                 split=split)
  except datasets.exceptions.DatasetGenerationError as e:
    where = (_bad_json_line(file) if file.suffix == ".jsonl" else None) or _root_cause(e)
    raise ConfigError(f"data file {str(file)!r} is not valid {_BUILDERS[file.suffix].upper()} "
                      f"({where}); expected one record per line") from e
  except (ValueError, StopIteration) as e:
    # `datasets` says "corresponds to no data" for a CSV with a header and no
    # rows, and leaks a bare StopIteration for a JSON file of blank lines.
    if isinstance(e, StopIteration) or "no data" in str(e):
      raise ConfigError(f"split {split!r} is empty: data file {str(file)!r} has no "
                        f"records; expected at least one example") from e
    raise ConfigError(f"could not read data file {str(file)!r} ({_root_cause(e)}); expected "
                      f"{_BUILDERS[file.suffix].upper()} records") from e


def _check_utf8(file: pathlib.Path, chunk_bytes: int = 1 << 20) -> None:
  """Raises if `file` is not UTF-8, naming the byte offset."""
  decoder = codecs.getincrementaldecoder("utf-8")()
  offset = 0
  with file.open("rb") as f:
    while chunk := f.read(chunk_bytes):
      try:
        decoder.decode(chunk)
      except UnicodeDecodeError as e:
        raise ConfigError(f"data file {str(file)!r} is not UTF-8 (byte {offset + e.start}); "
                          f"re-encode it as UTF-8") from None
      offset += len(chunk)
    try:
      decoder.decode(b"", final=True)
    except UnicodeDecodeError:
      raise ConfigError(f"data file {str(file)!r} is not UTF-8 (truncated character at the "
                        f"end); re-encode it as UTF-8") from None


def _bad_json_line(file: pathlib.Path) -> str | None:
  """'line N <text>: <why>' of the first line of a JSON Lines file that is not a JSON object.

  pyarrow's own message names neither the line nor its text.
  """
  with file.open(encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        return f"line {number} {line.strip()[:60]!r}: {e.msg}"
      if not isinstance(record, dict):
        return f"line {number} {line.strip()[:60]!r} is a {type(record).__name__}, not an object"
  return None


def _root_cause(error: BaseException) -> str:
  while error.__cause__ is not None or error.__context__ is not None:
    error = error.__cause__ or error.__context__
  return str(error).splitlines()[0] if str(error) else type(error).__name__


def _load_hub(name: str, split: str) -> datasets.Dataset:
  if not name:
    raise ConfigError(f"data.name is empty; pass --config.data.name=HUB_ID (e.g. "
                      f"cornell-movie-review-data/rotten_tomatoes) or {_FILES_HINT}")
  try:
    return datasets.load_dataset(name, split=split)
  except (ConnectionError, FileNotFoundError, ValueError) as e:
    # Offline mode, no network, an unknown id and an unknown split all land
    # here; the fix is the same: name the data, or read it from disk.
    raise ConfigError(f"could not load hub dataset {name!r} split {split!r} "
                      f"({type(e).__name__}: {_root_cause(e)}); pass a reachable "
                      f"--config.data.name or a local copy with {_FILES_HINT}") from e


def _load_tfds(data_config: ml_collections.ConfigDict, split: str) -> datasets.Dataset:
  """Reads a prepared TFDS split through its random-access data source."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("data.source='tfds' needs tensorflow-datasets and tensorflow-cpu; "
                      "pip install -e .[tfds]") from e
  name = data_config.name
  if not name:
    raise ConfigError(f"data.name is empty; pass --config.data.name=TFDS_NAME (e.g. "
                      f"imdb_reviews) or {_FILES_HINT}")
  try:
    source = tfds.data_source(name, split=split, data_dir=data_config.path or None,
                              download=False)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS raises a different type per failure (unknown name, not prepared,
    # bad split); all of them mean this name/split cannot be read here.
    raise ConfigError(f"could not open TFDS dataset {name!r} split {split!r} "
                      f"({type(e).__name__}: {_root_cause(e)}); prepare it with "
                      f"`tfds build {name} --file_format=array_record` (random access needs "
                      f"ArrayRecord) or pass {_FILES_HINT}") from e
  return _tfds_to_dataset(source, data_config, f"TFDS {name!r} split {split!r}")


def _tfds_to_dataset(source, data_config: ml_collections.ConfigDict,
                     where: str) -> datasets.Dataset:
  """Copies the required columns of a TFDS data source into a `datasets.Dataset`."""
  if len(source) == 0:
    raise ConfigError(f"{where} is empty; expected at least one example")
  _check_columns(list(source[0].keys()), data_config, where)
  records = [source[i] for i in range(len(source))]
  return datasets.Dataset.from_dict({name: [_to_python(record[name]) for record in records]
                                     for name in required_columns(data_config)})


def _to_python(value):
  """numpy scalars and bytes (TFDS Text features) to int/float/str."""
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8")
  return value
