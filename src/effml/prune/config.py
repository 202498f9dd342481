"""Validated settings of one pruning run."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .allocation import (
    ALLOCATIONS,
    AUTO_EPSILON,
    check_epsilon_candidates,
    check_epsilon_setting,
    check_sparsity,
)
from .auto_epsilon import AUTO_CANDIDATES
from .esd import METRICS
from .masks import parse_pattern
from .powerlaw import XMIN_STRATEGIES

METHODS = ("magnitude", "wanda", "sparsegpt")
GRANULARITIES = ("block", "matrix")


@dataclass
class PruneConfig:
    """``sparsity``: parameter-weighted target over the decoder linears (implied N/M when a
    ``pattern`` is given; pass None or the same value). ``allocation``: how the target is spread
    over layers. ``granularity``: one ratio per block (metric averaged over its matrices, the
    AlphaPruning default) or per matrix (alpha only). ``epsilon``: the range of the alpha mapping;
    a number keeps the reference behaviour exactly (0.3 is the paper's default), ``"auto"`` (the
    default) picks one of ``epsilon_candidates`` (0 = uniform included) by the calibration loss
    of a cheap one-shot Wanda proxy, see :mod:`effml.prune.auto_epsilon` (effml's addition)."""

    sparsity: float | None
    method: str = "wanda"
    allocation: str = "alpha"
    epsilon: float | str = AUTO_EPSILON
    epsilon_candidates: tuple[float, ...] = AUTO_CANDIDATES
    pattern: str | None = None
    metric: str = "alpha_hill"
    xmin: str = "peak"
    compat: bool = False
    granularity: str = "block"
    ceiling: float = 1.0
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    blocksize: int = 128
    damping: float = 0.01

    def __post_init__(self):
        def one_of(name, allowed):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

        one_of("method", METHODS)
        one_of("allocation", ALLOCATIONS)
        one_of("metric", tuple(METRICS))
        one_of("xmin", XMIN_STRATEGIES)
        one_of("granularity", GRANULARITIES)
        self.epsilon = check_epsilon_setting(self.epsilon)
        self.epsilon_candidates = check_epsilon_candidates(self.epsilon_candidates)
        nm = parse_pattern(self.pattern)
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is not None and abs(float(self.sparsity) - implied) > 1e-9:
                raise ValueError(
                    f"pattern {self.pattern} means sparsity {implied:g}; got sparsity={self.sparsity}: "
                    "pass sparsity=None (or the implied value) with a pattern"
                )
            self.sparsity = implied
        elif self.sparsity is None:
            raise ValueError("sparsity is required for unstructured pruning (a number in [0, 1))")
        self.sparsity = check_sparsity(self.sparsity)
        if self.allocation == "owl" and self.granularity != "block":
            raise ValueError("OWL allocates one ratio per block: use granularity='block'")
        if not 0 < self.ceiling <= 1:
            raise ValueError(f"ceiling must be in (0, 1], got {self.ceiling}")
        if self.owl_m <= 0 or not 0 <= self.owl_lambda < 1:
            raise ValueError(f"OWL needs owl_m > 0 and owl_lambda in [0, 1), got {self.owl_m}, {self.owl_lambda}")
        if self.blocksize < 1 or self.damping <= 0:
            raise ValueError(f"SparseGPT needs blocksize >= 1 and damping > 0, got {self.blocksize}, {self.damping}")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def auto_epsilon(self) -> bool:
        """Whether epsilon is chosen by the calibration proxy (alpha allocation only)."""
        return self.allocation == "alpha" and self.epsilon == AUTO_EPSILON

    @property
    def needs_data(self) -> bool:
        # epsilon="auto" scores candidates on calibration text, even for (data-free) magnitude
        return self.method != "magnitude" or self.allocation == "owl" or self.auto_epsilon

    def to_dict(self) -> dict:
        return asdict(self)
