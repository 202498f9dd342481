"""Pruning methods (AlphaPruning allocation over magnitude / Wanda / SparseGPT, OWL, uniform)."""
