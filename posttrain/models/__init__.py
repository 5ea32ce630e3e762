"""Megatron GPT models built from Hugging Face checkpoints, value heads and checkpoint conversion."""
