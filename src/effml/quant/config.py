"""Quantization settings as validated dataclasses: one common base, one subclass per method."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .quantizers import check_bits, check_grid

WEIGHT_QUANTIZERS = ("rtn", "gptq")


@dataclass
class QuantConfig:
    """Settings shared by every method.

    Bits: 2..8, or 16 for "not quantized". Weights are per output channel (``group_size=None``)
    or per group of ``group_size`` inputs; activations per token; K/V per (token, head).
    ``a_clip`` / ``kv_clip`` keep that fraction of each row's range (QuaRot: 0.9 / 0.95... 1.0 =
    no clipping); ``w_mse`` searches each weight row's clipping range (GPTQ's MSE grid).
    ``w_sym_grid`` (symmetric GPTQ weights): ``"minmax15"`` (default) uses
    ``scale = 2 absmax / (2^b - 1)`` (absmax / 7.5 at 4 bits, all 16 codes), the grid of the
    reference GPTQ code and llm-compressor; ``"absmax7"`` the older ``absmax / (2^(b-1) - 1)``
    (codes -7..7). On SmolLM2-135M W4A16 per channel (16 x 512 calibration, 4 eval windows)
    minmax15 gives 34.70 ppl against 37.35 (benchmarks/gptq_ablation.py); RTN keeps absmax7.
    Calibration (methods that need it): ``n_samples`` windows of ``seq_len`` tokens.
    """

    w_bits: int = 4
    a_bits: int = 16
    kv_bits: int = 16
    w_sym: bool = True
    group_size: int | None = None
    w_mse: bool = False
    w_sym_grid: str = "minmax15"
    a_sym: bool = True
    a_clip: float = 1.0
    kv_sym: bool = False
    kv_clip: float = 1.0
    weight_quantizer: str = "rtn"
    lm_head_bits: int = 16  # 2..8: weight-only RTN LM head (untied from the embeddings); 16: float
    # GPTQ
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    # calibration
    n_samples: int = 32
    seq_len: int = 512
    seed: int = 0
    device: str | None = None
    batch_size: int = 1

    def __post_init__(self):
        check_bits(self.w_bits, "w_bits")
        check_bits(self.a_bits, "a_bits")
        check_bits(self.kv_bits, "kv_bits")
        check_bits(self.lm_head_bits, "lm_head_bits")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive int or None (per channel), got {self.group_size!r}")
        for name in ("a_clip", "kv_clip"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        check_grid(self.w_sym_grid)
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"weight_quantizer must be one of {WEIGHT_QUANTIZERS}, got {self.weight_quantizer!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"damp (fraction of the mean Hessian diagonal) must be in [0, 1), got {self.damp}")
        for name in ("n_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def build(cls, **kwargs) -> QuantConfig:
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {cls.__name__}; allowed: {cls.field_names()}")
        return cls(**kwargs)

    def check_model(self, model) -> None:
        """Group size must divide every quantized linear's input dimension."""
        if self.group_size is None or self.w_bits >= 16:
            return
        from ..core.surgery import iter_linears

        for ref in iter_linears(model):
            n = ref.module.in_features
            if n % self.group_size:
                raise ValueError(
                    f"group_size={self.group_size} does not divide the input dimension {n} of {ref.name}: "
                    f"use a common divisor of the model's linear input sizes, or None for per-channel"
                )
