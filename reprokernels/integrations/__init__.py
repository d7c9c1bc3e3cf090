"""Adapters for Hugging Face transformers / PEFT (optional dependencies, imported on demand)."""
