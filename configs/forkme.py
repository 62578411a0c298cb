"""Fork me: fine-tune your model on your data. Every key, with what it means.

  python -m ftjax.main --config=configs/forkme.py --workdir=/tmp/forkme \
      --config.model.name_or_path=/path/to/hf_model --config.data.path=/path/to/data

Copy this file, change what you need, and leave the rest at the defaults in
`ftjax/config.py` (a key this file does not know is an error, not ignored).
"""

from ftjax import config as config_lib


def get_config():
  config = config_lib.default_config()

  # --- Model -------------------------------------------------------------
  # Hub id (e.g. "bert-base-uncased") or a folder with config.json +
  # model.safetensors (or model.safetensors.index.json) + tokenizer files.
  config.model.name_or_path = ""
  # "classification": the family's sequence-classification head (BERT's
  # pooler, RoBERTa's/DistilBERT's head); "encoder": hidden states only.
  config.model.task = "classification"
  # Number of classes; leave unset to take it from the checkpoint's id2label.
  config.model.num_labels = 2
  # Compute dtype ("float32", "bfloat16", "float16"); weights stay float32.
  config.model.dtype = "float32"
  # Load a pickled pytorch_model.bin (torch.load(weights_only=True)). Only for
  # checkpoints you trust; prefer converting them to safetensors.
  config.model.allow_pickle = False

  # --- Data --------------------------------------------------------------
  # A folder holding <split>.jsonl (or .json/.csv/.parquet), or one file.
  config.data.path = ""
  config.data.text_column = "text"
  config.data.label_column = "label"
  config.data.train_split = "train"
  # Tokens per example after truncation.
  config.data.max_length = 128

  # --- Run ---------------------------------------------------------------
  config.batch_size = 32
  config.seed = 0
  return config
