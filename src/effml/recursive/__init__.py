"""Relaxed Recursive Transformers: layer tying, per-depth LoRA, uptraining, depth-wise batching."""
