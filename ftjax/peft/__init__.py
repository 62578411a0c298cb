"""Parameter-efficient fine-tuning: trainable partitions and LoRA."""
