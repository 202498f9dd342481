"""Quantization methods (FlatQuant and its baselines). Methods register themselves on import."""
