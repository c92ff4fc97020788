"""Adapting models: Hugging Face import and export, LoRA, quantization, pruning."""
