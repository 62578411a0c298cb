"""Fork me: fine-tune your model on your data. Every key, with what it means.

  python -m ftjax.main --config=configs/forkme.py --workdir=/tmp/forkme \
      --config.model.name_or_path=/path/to/hf_model --config.data.path=/path/to/data

Copy this file, change what you need; ftjax/config.py holds the defaults and
the checks (a key this file does not know is an error, never ignored).
"""

from ftjax import config as config_lib


def get_config():
  config = config_lib.default_config()

  # --- Objective ---------------------------------------------------------
  # What the run optimises (ftjax/objectives/): "" is the objective of
  # model.task ("classification" here). Your own objective: register it in a
  # module this file imports, set its name here and its keys beside it.
  # Distillation: config_lib.set_objective(config, "distill") adds its keys
  # (teacher, alpha, temperature, ...; see configs/distill_minilm.py).
  config.objective.name = ""
  # The module that registers it (filled in and recorded automatically).
  config.objective.module = ""

  # --- Model -------------------------------------------------------------
  # Hub id (e.g. "bert-base-uncased") or a folder with config.json +
  # model.safetensors (or model.safetensors.index.json) + tokenizer files.
  config.model.name_or_path = ""
  # "classification" (train) or "encoder" (hidden states; --mode=probe only).
  config.model.task = "classification"
  # Number of classes; unset: the checkpoint's id2label.
  config.model.num_labels = 2
  # "pooler": the HF head as pre-trained; "cls": first token; "mean": mean of tokens.
  config.model.pooling = "pooler"
  # Compute dtype ("float32", "bfloat16", "float16"); weights stay float32.
  config.model.dtype = "float32"
  # Recompute each layer in the backward pass: "none", "full", "dots_saveable".
  config.model.remat = "none"
  # One jax.lax.scan per run of alike layers (same results and checkpoints).
  config.model.scan_layers = False
  # Load a pickled pytorch_model.bin (torch.load(weights_only=True)); only for
  # checkpoints you trust. Prefer converting them to safetensors.
  config.model.allow_pickle = False
  # Keep only these layers of the checkpoint, renumbered (a student cut from
  # a teacher: (0, 2, 4) of 6); () keeps every layer. model.name_or_path may
  # also be a finished ftjax run's workdir (its fine-tuned weights).
  config.model.layers = ()

  # --- Data --------------------------------------------------------------
  # "files" (data.path), "hf" (hub dataset data.name) or "tfds" (data.name).
  config.data.source = "files"
  config.data.name = ""
  # A folder holding <split>.jsonl (or .json/.csv/.parquet), or one file.
  config.data.path = ""
  config.data.text_column = "text"
  config.data.text_pair_column = ""  # e.g. "hypothesis" for sentence pairs
  config.data.label_column = "label"
  config.data.train_split = "train"
  # Tokens per example after truncation (truncations are counted in the log).
  config.data.max_length = 128
  # Padded lengths XLA compiles for; () picks num_buckets from the data.
  config.data.bucket_lengths = ()
  config.data.num_buckets = 4

  # --- What trains -------------------------------------------------------
  # "full" | "freeze" | "head_only" | "lora".
  config.strategy.name = "full"
  # freeze: embeddings (if freeze_embeddings) + encoder layers 0..K-1 frozen.
  config.strategy.freeze_layers = 0
  config.strategy.freeze_embeddings = True
  # Your own (regex, "trainable"|"frozen") rules over parameter paths, tried
  # first, e.g. ((r"encoder/layers/\d+/attention_norm/.*", "trainable"),).
  config.strategy.rules = ()
  # PEFT adapters stacked on the model, in order (registered names; "lora"
  # is shipped). strategy.name="lora" means ("lora",) on a frozen model.
  config.strategy.adapters = ()
  # lora: W x + (alpha / rank) * B A x on the target modules; classifier trains.
  config.strategy.lora.rank = 8
  config.strategy.lora.alpha = 16.0
  config.strategy.lora.dropout = 0.0
  config.strategy.lora.targets = (r".*/attention/(query|value)",)

  # --- Optimizer (AdamW) -------------------------------------------------
  config.optimizer.learning_rate = 5e-5
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.01  # not on biases, norms, embeddings
  config.optimizer.warmup_fraction = 0.06  # or warmup_steps (set one)
  config.optimizer.end_learning_rate = 0.0  # linear decay target
  config.optimizer.grad_clip_norm = 1.0  # 0: off
  config.optimizer.accumulation_steps = 1  # micro-batches per step

  # --- Training length and cadence ---------------------------------------
  config.training.batch_size = 32  # global: all devices, all hosts
  config.training.num_epochs = 3.0  # training.num_steps, when set, wins
  config.training.log_every_steps = 50
  config.eval.splits = ("validation", "test")
  config.eval.every_steps = None  # None: once per epoch
  config.eval.batch_size = 128
  config.eval.metric = "validation/accuracy"  # for keep-best and early stopping
  config.eval.mode = "max"
  config.eval.early_stopping_patience = 0  # evaluations without improvement; 0: off
  config.checkpoint.every_steps = None  # None: at every evaluation
  config.checkpoint.max_to_keep = 2
  config.checkpoint.keep_best = True
  # Verify a checkpoint (sizes + blake2b of its files) before restoring it; a
  # damaged one is moved aside and the previous one used. False skips it.
  config.checkpoint.verify = True

  # --- Devices -----------------------------------------------------------
  # data x fsdp x tensor = number of devices (-1: the rest).
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1

  config.seed = 0
  return config
