"""Validated settings of a recursive conversion."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.arch import ROLES

STRATEGIES = ("cycle", "sequence", "middle_cycle")
INITS = ("stepwise", "average", "lower")
LORA_INITS = ("svd", "asvd", "zero")  # asvd: activation-aware SVD, needs calib
TIE_NORMS = (True, False, "foldable")

Rank = int | str | Mapping


@dataclass
class RecursiveConfig:
    """How to turn an L-layer decoder into K shared blocks looped ``num_loops`` times.

    ``lora_rank``: an int (every target), ``"full"`` (min(in, out) per target) or a dict
    role -> int/"full" (roles left out get rank 0). ``tie_norms``: ``True`` ties every block norm,
    ``False`` keeps one norm per depth, ``"foldable"`` ties only norms that feed a projection
    (their difference is folded into the LoRA residual) and keeps the others per depth.
    """

    num_loops: int = 2
    strategy: str = "cycle"
    init: str = "stepwise"
    lora_rank: Rank = 0
    lora_init: str = "svd"
    lora_targets: tuple[str, ...] = ROLES
    tie_norms: bool | str = True
    seed: int = 0
    ranks: dict[str, int | str] = field(init=False, repr=False)

    def __post_init__(self):
        if isinstance(self.num_loops, bool) or not isinstance(self.num_loops, int) or self.num_loops < 1:
            raise ValueError(f"num_loops must be a positive int, got {self.num_loops!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; choose one of {STRATEGIES}")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose one of {INITS}")
        if self.lora_init not in LORA_INITS:
            raise ValueError(f"unknown lora_init {self.lora_init!r}; choose one of {LORA_INITS}")
        if self.tie_norms not in TIE_NORMS or (self.tie_norms in (0, 1) and not isinstance(self.tie_norms, bool)):
            raise ValueError(f"tie_norms must be one of {TIE_NORMS}, got {self.tie_norms!r}")
        if isinstance(self.lora_targets, str):
            self.lora_targets = (self.lora_targets,)
        self.lora_targets = tuple(self.lora_targets)
        unknown = [t for t in self.lora_targets if t not in ROLES]
        if unknown:
            raise ValueError(f"unknown lora target(s) {unknown}; targets are roles from {ROLES}")
        self.ranks = self._per_target_ranks()

    def _per_target_ranks(self) -> dict[str, int | str]:
        """role -> requested rank (int or "full") for every target; validates values."""
        r = self.lora_rank
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
    def relaxed(self) -> bool:
        """Whether any target gets a LoRA (rank > 0 or "full")."""
        return any(r == "full" or r > 0 for r in self.ranks.values())

    def to_dict(self) -> dict:
        rank = dict(self.lora_rank) if isinstance(self.lora_rank, Mapping) else self.lora_rank
        return {
            "num_loops": self.num_loops, "strategy": self.strategy, "init": self.init, "lora_rank": rank,
            "lora_init": self.lora_init, "lora_targets": list(self.lora_targets), "tie_norms": self.tie_norms,
            "seed": self.seed,
        }


def _check_rank(value, role: str) -> int | str:
    if value == "full":
        return "full"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"LoRA rank for {role!r} must be a non-negative int or 'full', got {value!r}")
    if value < 0:
        raise ValueError(f"LoRA rank for {role!r} must be >= 0 (0 = no LoRA), got {value}")
    return value
