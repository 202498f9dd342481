"""A linear over a (possibly shared) base weight plus this depth's own low-rank correction.

The base ``weight``/``bias`` may be the very ``nn.Parameter`` objects of other depths; the LoRA
factors always belong to this module alone, so a depth's relaxation is never merged into the
shared weight. A fused projection (phi3 ``qkv_proj``) carries one LoRA per role, each writing
only that role's output rows.

Once the model is quantized, the shared base is a ``base`` module instead (one
``effml.quant.QuantLinear`` object for every depth of a group, so it is quantized once and stays
shared); the LoRA factors stay in floating point and see the unquantized input.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..core.io import register_module_type


@register_module_type
class DepthLoRALinear(nn.Module):
    """``y = x W^T + b + concat_role(x A_role^T B_role^T + c_role)``, effective LoRA scale 1.

    ``roles``: role -> (start, stop) output rows; ``ranks``: role -> rank (roles absent or 0 get
    no correction); ``bias_delta``: roles that also carry a per-depth bias correction (only
    when the base has a bias, so a tied bias can be relaxed exactly too).
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, roles: dict[str, tuple[int, int]],
                 ranks: dict[str, int], bias_delta: tuple[str, ...] = ()):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype_name = str(weight.dtype).removeprefix("torch.")
        self.weight = weight
        self.bias = bias
        self.base: nn.Module | None = None  # set by use_base: a compressed linear shared by the depths
        self.roles = {r: (int(a), int(b)) for r, (a, b) in sorted(roles.items(), key=lambda kv: kv[1][0])}
        self.ranks = {r: int(k) for r, k in ranks.items() if int(k) > 0}
        unknown = set(self.ranks) - set(self.roles)
        if unknown:
            raise ValueError(f"ranks for roles {sorted(unknown)} that this linear does not hold ({list(self.roles)})")
        if bias_delta and bias is None:
            raise ValueError("bias_delta needs a base bias")
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_bias = nn.ParameterDict()
        dtype, device = weight.dtype, weight.device
        for role, r in self.ranks.items():
            a, b = self.roles[role]
            self.lora_A[role] = nn.Parameter(torch.zeros(r, self.in_features, dtype=dtype, device=device))
            self.lora_B[role] = nn.Parameter(torch.zeros(b - a, r, dtype=dtype, device=device))
        for role in bias_delta:
            a, b = self.roles[role]
            self.lora_bias[role] = nn.Parameter(torch.zeros(b - a, dtype=dtype, device=device))

    # --- initialisation ----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_residual(self, role: str, residual: torch.Tensor, bias_residual: torch.Tensor | None,
                           generator: torch.Generator, gram: torch.Tensor | None = None,
                           damp: float = 0.01) -> tuple[str, float]:
        """Truncated SVD of ``residual`` (B = U_r S_r, A = V_r^T); a zero residual falls back to
        the standard LoRA init (A random, B zero). Returns which init was used and the fraction
        of the residual's norm the rank-r factors reproduce (1.0 when exact).

        With ``gram`` (E[x xᵀ] of this linear's inputs) the factors minimise the output error
        ``||(R - BA) x||`` instead of ``||R - BA||_F``: with ``G + damp·mean(diag G)·I = L Lᵀ``,
        ``R L = U S Vᵀ`` and ``BA = U_r S_r V_rᵀ L⁻¹`` (whitened SVD, as in SVD-LLM). Full rank
        is still exact, and truncation stays nested. The kept fraction is then in that norm.
        """
        if role in self.lora_bias:
            self.lora_bias[role].copy_(bias_residual if bias_residual is not None else 0.0)
        if role not in self.ranks:
            return "none", 0.0
        r = self.ranks[role]
        if not torch.any(residual != 0):
            self.standard_init(role, generator)
            return "standard", 1.0
        if gram is None:
            u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
            self.lora_B[role].copy_(u[:, :r] * s[:r])
            self.lora_A[role].copy_(vh[:r])
            kind = "svd"
        else:
            g = gram.to(torch.float64).clone()
            if g.shape != (self.in_features, self.in_features):
                raise ValueError(f"gram must be [{self.in_features}, {self.in_features}], got {list(g.shape)}")
            g.diagonal().add_(damp * g.diagonal().mean().clamp_min(1e-12))
            chol = torch.linalg.cholesky(g)
            u, s, vh = torch.linalg.svd(residual.to(torch.float64) @ chol, full_matrices=False)
            a = torch.linalg.solve_triangular(chol.T, vh[:r].T, upper=True).T  # V_rᵀ L⁻¹
            norms = a.norm(dim=1, keepdim=True).clamp_min(1e-30)
            # unit-norm rows of A as in the plain SVD init; the scale goes to B
            self.lora_A[role].copy_(a / norms)
            self.lora_B[role].copy_(u[:, :r] * (s[:r] * norms[:, 0]))
            kind = "asvd"
        energy = s.double().square()
        return kind, 1.0 - float((energy[r:].sum() / energy.sum()).sqrt())

    @torch.no_grad()
    def standard_init(self, role: str, generator: torch.Generator) -> None:
        """Kaiming-uniform A, zero B: the module's output is unchanged until B trains."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform with a = sqrt(5)
        a = torch.rand(self.lora_A[role].shape, generator=generator) * 2 * bound - bound
        self.lora_A[role].copy_(a)
        self.lora_B[role].zero_()

    def use_base(self, base: nn.Module) -> None:
        """Route the base product through ``base`` (which then owns weight and bias); the
        depths of a group pass the same object, so what it stores is shared, never copied."""
        if (base.in_features, base.out_features) != (self.in_features, self.out_features):
            raise ValueError(f"base is {base.in_features}->{base.out_features}, this linear "
                             f"{self.in_features}->{self.out_features}")
        self.base = base
        self.weight = None
        self.bias = None

    # --- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x) if self.base is not None else F.linear(x, self.weight, self.bias)
        if not self.ranks and not len(self.lora_bias):
            return y
        pieces = []
        for role, (a, b) in self.roles.items():
            d = None
            if role in self.ranks:
                d = F.linear(F.linear(x, self.lora_A[role]), self.lora_B[role])
            if role in self.lora_bias:
                d = self.lora_bias[role] if d is None else d + self.lora_bias[role]
            if d is None:
                d = x.new_zeros(*x.shape[:-1], b - a)
            elif d.dim() == 1:
                d = d.expand(*x.shape[:-1], b - a)
            pieces.append(d)
        return y + (pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1))

    def lora_parameters(self) -> list[nn.Parameter]:
        return [*self.lora_A.values(), *self.lora_B.values(), *self.lora_bias.values()]

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, ranks={self.ranks}, bias_delta={list(self.lora_bias)}"

    # --- effml save/load -----------------------------------------------------------------------
    def effml_spec(self) -> dict:
        has_bias = (self.bias if self.base is None else self.base.bias) is not None
        spec = {
            "in_features": self.in_features, "out_features": self.out_features, "bias": has_bias,
            "roles": {r: list(v) for r, v in self.roles.items()}, "ranks": dict(self.ranks),
            "bias_delta": list(self.lora_bias), "dtype": self.dtype_name,
        }
        if self.base is not None:
            # the base is saved inside this spec: effml.save records a module shared by several
            # depths under one path only, and every depth needs its own rebuilt (then retied) copy
            spec["base"] = {"type": type(self.base).__name__, "spec": self.base.effml_spec()}
            act = getattr(self.base, "act_quant", None)
            if act is not None:
                spec["base"]["act_quant"] = act.effml_spec()
        return spec

    @classmethod
    def effml_build(cls, spec: dict) -> DepthLoRALinear:
        dtype = getattr(torch, spec.get("dtype", "float32"))
        weight = nn.Parameter(torch.empty(spec["out_features"], spec["in_features"], dtype=dtype))
        bias = nn.Parameter(torch.empty(spec["out_features"], dtype=dtype)) if spec["bias"] else None
        roles = {r: tuple(v) for r, v in spec["roles"].items()}
        bias_delta = tuple(spec["bias_delta"])
        m = cls(weight, bias, roles, spec["ranks"], bias_delta)
        if "base" in spec:
            from ..quant.qlinear import QuantLinear  # the one compressed base type

            if spec["base"]["type"] != QuantLinear.__name__:
                raise ValueError(f"unsupported DepthLoRALinear base {spec['base']['type']!r}")
            base = QuantLinear.effml_build(spec["base"]["spec"])
            if "act_quant" in spec["base"]:
                from ..quant.act import ActQuantizer

                base.act_quant = ActQuantizer.effml_build(spec["base"]["act_quant"])
            m.use_base(base)
        return m


@torch.no_grad()
def truncate_ranks(model: nn.Module, rank: int) -> int:
    """Cut every :class:`DepthLoRALinear` to at most ``rank`` (keeping the leading factors).

    For SVD-initialised factors this equals converting directly at the lower rank, since a
    truncated SVD is nested; it lets a sweep pay for one SVD per weight. Returns how many
    factors changed. Rank 0 is not allowed here: convert with ``lora_rank=0`` instead.
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r} (for rank 0 recursify with lora_rank=0)")
    changed = 0
    for m in model.modules():
        if not isinstance(m, DepthLoRALinear):
            continue
        for role, r in list(m.ranks.items()):
            if r > rank:
                m.lora_A[role] = nn.Parameter(m.lora_A[role][:rank].clone())
                m.lora_B[role] = nn.Parameter(m.lora_B[role][:, :rank].clone())
                m.ranks[role] = rank
                changed += 1
    return changed
