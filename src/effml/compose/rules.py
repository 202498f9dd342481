"""Which orders of steps effml supports: one table of (earlier kind, later kind) -> check.

Every pair of steps is checked, not only neighbours (quantize -> recursify -> quantize is as
wrong as quantize -> quantize), and so is every step the model already went through (read from
its ``effml_report`` history and its modules). A check returns None (fine), or an
:class:`Issue`: ``"error"`` refuses the recipe before any work, ``"warning"`` is emitted and the
recipe runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .recipe import Step


@dataclass(frozen=True)
class Issue:
    level: str  # "error" or "warning"
    message: str


def _quantize_twice(a: Step, b: Step) -> Issue:
    return Issue("error", f"{a.where} already quantizes the model and effml quantizes once: "
                          f"merge the options of {b.where} into that quantize step")


def _recursify_twice(a: Step, b: Step) -> Issue:
    return Issue("error", f"{a.where} already makes the model recursive: recursify once, with the "
                          "num_loops you want, on the original model")


def _recursify_after_quantize(a: Step, b: Step) -> Issue:
    return Issue("error", f"recursify needs the float weights that {a.where} replaced by integer codes: "
                          "put the recursify step before the quantize step")


def _quant_config(step: Step):
    """The quantize step's config: the dataclass of a recipe step, the stored dict of a past one."""
    return step.config if step.config is not None else step.config_dict


def _quant_trait(trait, step: Step) -> bool | None:
    """A quantize method's composition trait (effml.quant.api), or None when the method is not
    known (a quantized model whose report was lost)."""
    try:
        return trait(step.method, _quant_config(step))
    except (ValueError, TypeError):
        return None


def _prune_after_quantize(a: Step, b: Step) -> Issue | None:
    from ..quant.api import prunable_after

    if _quant_trait(prunable_after, a):
        return None  # pruned weights take the zero-point code; the quantizer's scales stay
    return Issue("error", f"{b.where} cannot prune a model quantized by {a.where}, whose weights sit behind "
                          "online transforms: put the prune step before the quantize step")


def _quantize_after_prune(a: Step, b: Step) -> Issue | None:
    from ..quant.api import preserves_sparsity

    if _quant_trait(preserves_sparsity, b):
        return None
    return Issue("warning", f"{b.where} stores transformed (rotated) weights, which are dense whatever the "
                            f"zeros {a.where} made: the stored weights lose the sparsity. Quantize with rtn, "
                            "gptq or smoothquant to keep it")


def _quantize_after_recursify(a: Step, b: Step) -> Issue | None:
    from ..quant.api import supports_recursive

    if _quant_trait(supports_recursive, b):
        return None  # the shared blocks are quantized once and stay shared; LoRA stays float
    return Issue("error", f"{b.where} cannot quantize a recursive model (made by {a.where}): it folds norms and "
                          "transforms into each depth's weights, which would untie the shared blocks. "
                          "Quantize with rtn, gptq or smoothquant")


def _prune_after_prune(a: Step, b: Step) -> Issue | None:
    before, now = a.config_dict.get("sparsity"), b.config_dict.get("sparsity")
    if before is not None and now is not None and now < before - 1e-12:
        return Issue("error", f"{b.where} asks for sparsity {now:g}, lower than the {before:g} that {a.where} "
                              "already reached: pruning cannot bring weights back; prune the original model "
                              "or ask for at least that sparsity")
    return None


def _recursify_after_prune(a: Step, b: Step) -> Issue | None:
    if b.config_dict.get("init") == "average":
        return Issue("warning", f"{b.where} with init='average' averages the pruned layers of each group, "
                                f"whose zeros differ: the shared weights lose most of {a.where}'s sparsity. "
                                "Use init='stepwise' or 'lower' to keep it")
    return None


RULES: dict[tuple[str, str], Callable[[Step, Step], Issue | None]] = {
    ("quantize", "quantize"): _quantize_twice,
    ("recursify", "recursify"): _recursify_twice,
    ("quantize", "recursify"): _recursify_after_quantize,
    ("quantize", "prune"): _prune_after_quantize,
    ("prune", "quantize"): _quantize_after_prune,
    ("prune", "prune"): _prune_after_prune,
    ("prune", "recursify"): _recursify_after_prune,
    ("recursify", "quantize"): _quantize_after_recursify,
    # supported as it is: recursify -> prune. The shared weights are pruned in place and stay shared;
    # the first depth of a group chooses the mask from its inputs, a later depth only adds zeros if
    # its allocated ratio is higher (its metric ranks the existing zeros first)
}


def order_issues(steps: list[Step]) -> list[Issue]:
    """Issues of every (earlier, later) pair of ``steps`` whose later step is in the recipe
    (steps from the model's history have ``index=None`` and come first); duplicates once."""
    out: list[Issue] = []
    for j, later in enumerate(steps):
        if later.index is None:
            continue  # the model's own past is not the recipe's to judge
        for earlier in steps[:j]:
            check = RULES.get((earlier.kind, later.kind))
            issue = check(earlier, later) if check else None
            if issue is not None and issue not in out:
                out.append(issue)
    return out
