"""Validated settings of a recursive conversion."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ..core.arch import ROLES

STRATEGIES = ("cycle", "sequence", "middle_cycle")
INITS = ("stepwise", "average", "lower")
LORA_INITS = ("svd", "asvd", "zero")  # asvd: activation-aware SVD, needs calib; None = auto (asvd with calib)
TIE_NORMS = (True, False, "foldable")
BUDGET_METRICS = ("relative", "absolute")

Rank = int | str | Mapping | Sequence


@dataclass
class RecursiveConfig:
    """How to turn an L-layer decoder into K shared blocks looped ``num_loops`` times.

    ``lora_rank``: an int (every target), ``"full"`` (min(in, out) per target), a dict
    role -> int/"full" (roles left out get rank 0), or a list with one of those per depth
    (``recursify`` checks its length against the model). ``lora_init``: ``"svd"``, ``"asvd"``,
    ``"zero"``, or ``None`` ("auto": ``recursify`` picks ``"asvd"`` when it has calibration data,
    else ``"svd"``). ``param_budget``: a fraction in (0, 1) of the original non-embedding
    parameters; ``recursify`` then chooses the ranks per depth and target itself (``lora_rank``
    must stay 0), by whitened residual energy per parameter, each (depth, target)'s energy taken
    as a fraction of that linear's own output energy (``budget_metric="relative"``) or as it is
    (``"absolute"``). ``tie_norms``: ``True`` ties every block norm, ``False`` keeps one norm per depth,
    ``"foldable"`` ties only norms that feed a projection (their difference is folded into the
    LoRA residual) and keeps the others per depth.
    """

    num_loops: int = 2
    strategy: str = "cycle"
    init: str = "stepwise"
    lora_rank: Rank = 0
    lora_init: str | None = None
    lora_targets: tuple[str, ...] = ROLES
    tie_norms: bool | str = True
    seed: int = 0
    param_budget: float | None = None
    budget_metric: str = "relative"
    ranks: dict[str, int | str] = field(init=False, repr=False)  # uniform ranks (empty dict for a per-depth list)
    depth_ranks: list[dict[str, int | str]] | None = field(init=False, repr=False)  # per depth, or None

    def __post_init__(self):
        if isinstance(self.num_loops, bool) or not isinstance(self.num_loops, int) or self.num_loops < 1:
            raise ValueError(f"num_loops must be a positive int, got {self.num_loops!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        if self.lora_init is not None and self.lora_init not in LORA_INITS:
            raise ValueError(f"unknown lora_init {self.lora_init!r}; choose one of {LORA_INITS} (or None: auto)")
        if self.tie_norms not in TIE_NORMS or (self.tie_norms in (0, 1) and not isinstance(self.tie_norms, bool)):
            raise ValueError(f"tie_norms must be one of {TIE_NORMS}, got {self.tie_norms!r}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        self.lora_targets = tuple(self.lora_targets)
        unknown = [t for t in self.lora_targets if t not in ROLES]
        if unknown:
            raise ValueError(f"unknown lora target(s) {unknown}; targets are roles from {ROLES}")
        r = self.lora_rank
        if isinstance(r, Sequence) and not isinstance(r, str):
            if not len(r):
                raise ValueError("lora_rank as a list needs one entry per depth, got an empty list")
            self.depth_ranks = [self._per_target_ranks(v) for v in r]
            self.ranks = {}
        else:
            self.depth_ranks = None
            self.ranks = self._per_target_ranks(r)
        if self.param_budget is not None:
            b = self.param_budget
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1:
                raise ValueError(f"param_budget must be a fraction in (0, 1) of the original non-embedding "
                                 f"parameters, got {b!r} (1 or more would keep the original model)")
            if self.budget_metric not in BUDGET_METRICS:
                raise ValueError(f"unknown budget_metric {self.budget_metric!r}; choose one of {BUDGET_METRICS}")
            if self.relaxed_by_rank:
                raise ValueError("param_budget chooses the LoRA ranks per depth and target itself: leave lora_rank "
                                 f"at 0, got lora_rank={self.lora_rank!r}")

    def _per_target_ranks(self, r) -> dict[str, int | str]:
        """role -> requested rank (int or "full") for every target; validates values."""
        if isinstance(r, Mapping):
            unknown = [t for t in r if t not in ROLES]
            if unknown:
                raise ValueError(f"lora_rank has unknown target(s) {unknown}; targets are roles from {ROLES}")
            outside = [t for t in r if t not in self.lora_targets and _check_rank(r[t], t) != 0]
            if outside:
                raise ValueError(f"lora_rank names {outside}, which are not in lora_targets {self.lora_targets}")
            return {t: _check_rank(r.get(t, 0), t) for t in self.lora_targets}
        return {t: _check_rank(r, t) for t in self.lora_targets}

    @property
    def relaxed_by_rank(self) -> bool:
        """Whether ``lora_rank`` gives any target of any depth a LoRA (rank > 0 or "full")."""
        every = self.depth_ranks if self.depth_ranks is not None else [self.ranks]
        return any(r == "full" or r > 0 for ranks in every for r in ranks.values())

    @property
    def relaxed(self) -> bool:
        """Whether any target gets a LoRA: a rank > 0 or "full", or a parameter budget to spend."""
        return self.relaxed_by_rank or self.param_budget is not None

    def ranks_of_depth(self, depth: int) -> dict[str, int | str]:
        return self.ranks if self.depth_ranks is None else self.depth_ranks[depth]

    def to_dict(self) -> dict:
        def plain(r):
            return dict(r) if isinstance(r, Mapping) else r

        r = self.lora_rank
        rank = [plain(v) for v in r] if isinstance(r, Sequence) and not isinstance(r, str) else plain(r)
        out = {
            "num_loops": self.num_loops, "strategy": self.strategy, "init": self.init, "lora_rank": rank,
            "lora_init": self.lora_init, "lora_targets": list(self.lora_targets), "tie_norms": self.tie_norms,
            "seed": self.seed,
        }
        if self.param_budget is not None:
            out["param_budget"] = self.param_budget
            out["budget_metric"] = self.budget_metric
        return out


def _check_rank(value, role: str) -> int | str:
    if value == "full":
        return "full"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"LoRA rank for {role!r} must be a non-negative int or 'full', got {value!r}")
    if value < 0:
        raise ValueError(f"LoRA rank for {role!r} must be >= 0 (0 = no LoRA), got {value}")
    return value
