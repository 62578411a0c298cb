"""The optimizer: an optax chain over the trainable partition.

AdamW with decoupled weight decay (not applied to biases, norm scales or
embeddings, as in the Hugging Face Flax GLUE example's `decay_mask_fn`),
global-norm clipping, and a linear warmup + linear decay schedule. The chain
is built for the *trainable* tree only (`ftjax.peft.partition.split`), so a
frozen parameter has no optimizer state and receives no update by
construction, and no zero gradients are ever materialised for it.

Gradient accumulation is done inside the train step (a scan over
micro-batches), not with `optax.MultiSteps`: one compiled step per global
batch and no extra gradient buffer in the optimizer state.
"""

import re

import jax
import ml_collections
import optax

from ftjax.models import keymap

# Weight decay applies to weight matrices (and LoRA's factors, bottleneck
# adapters' projections) only: not to biases, norms, embeddings, IA3's scales
# (decay would pull them to 0, not 1), DoRA's magnitudes or virtual tokens.
_DECAYED = re.compile(r".*/(kernel|lora_a|lora_b|adapter_down|adapter_up)")


def schedule(config: ml_collections.ConfigDict, *, total_steps: int,
             warmup_steps: int) -> optax.Schedule:
  o = config.optimizer
  decay = optax.linear_schedule(o.learning_rate, o.end_learning_rate,
                                max(1, total_steps - warmup_steps))
  if not warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, o.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(trainable) -> dict:
  """True for leaves that get weight decay."""
  flat = keymap.flatten(trainable)
  return keymap.unflatten({p: bool(_DECAYED.fullmatch(p)) for p in flat}, trainable)


def build(config: ml_collections.ConfigDict, trainable,
          learning_rate: optax.Schedule) -> optax.GradientTransformation:
  o = config.optimizer
  chain = []
  if o.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  chain.append(optax.adamw(learning_rate, b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay, mask=decay_mask(trainable)))
  ratio = config.strategy.lora.get("lr_ratio", 1.0)
  if ratio != 1.0:
    # LoRA+ (Hayou et al., 2024): B's learning rate is `ratio` times A's. AdamW's
    # update (decay included) is linear in the learning rate, so scaling B's
    # updates is B in its own parameter group, with no second optimizer state.
    chain.append(optax.masked(optax.scale(ratio), lora_b_mask(trainable)))
  return optax.chain(*chain)


def lora_b_mask(trainable) -> dict:
  """True for LoRA's B factors (LoRA+ gives them their own learning rate)."""
  flat = keymap.flatten(trainable)
  return keymap.unflatten({p: p.endswith("/lora_b") for p in flat}, trainable)


def state_bytes(opt_state) -> int:
  """Bytes of optimizer state (moments, counts)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state)
             if hasattr(x, "dtype"))
