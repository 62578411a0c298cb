"""Parameter-efficient fine-tuning: trainable partitions and adapters (`ftjax.peft.adapter`)."""

# The built-in adapters register themselves with `ftjax.peft.adapter` on import,
# so any use of ftjax.peft sees them in the registry.
from ftjax.peft import lora  # noqa: F401  pylint: disable=unused-import
from ftjax.peft import ia3, bottleneck  # noqa: F401  pylint: disable=unused-import
from ftjax.peft import quant  # noqa: F401  pylint: disable=unused-import
from ftjax.peft import prompt  # noqa: F401  pylint: disable=unused-import
