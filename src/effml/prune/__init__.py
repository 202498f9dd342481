"""Pruning methods (AlphaPruning allocation over magnitude / Wanda / SparseGPT, OWL, uniform).

``effml.prune`` is both this package and a function: calling the module forwards to
:func:`effml.prune.api.prune`, so ``effml.prune(model, 0.7, method="wanda")`` works while
``effml.prune.esd`` and friends stay importable.
"""

import sys
import types

from . import cli  # noqa: F401,E402  (registers the `effml prune` and `effml esd` commands)
from .allocation import ALLOCATIONS, alpha_allocation, nm_allocation, owl_allocation, uniform_allocation
from .api import prune, prune_model, verify_sparsity
from .config import METHODS, PruneConfig
from .esd import METRICS, ESDRecord, ESDResult, esd, weights_fingerprint
from .plot import plot_esd
from .powerlaw import XMIN_STRATEGIES, fit_power_law, hill_estimator

__all__ = [
    "ALLOCATIONS", "ESDRecord", "ESDResult", "METHODS", "METRICS", "PruneConfig", "XMIN_STRATEGIES",
    "alpha_allocation", "esd", "fit_power_law", "hill_estimator", "nm_allocation", "owl_allocation",
    "plot_esd", "prune", "prune_model", "uniform_allocation", "verify_sparsity", "weights_fingerprint",
]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return prune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
