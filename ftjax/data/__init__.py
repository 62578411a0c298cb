"""Input data: sources, tokenisation and batching."""
