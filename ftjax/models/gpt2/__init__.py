"""GPT-2 decoders."""
