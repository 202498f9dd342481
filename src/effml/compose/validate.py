"""Validate a whole recipe, against itself and against the model, before any step runs."""

from __future__ import annotations

import warnings

import torch.nn as nn

from .recipe import RecipeError, Step, parse_step, read_recipe
from .rules import order_issues


def model_history(model: nn.Module) -> list[Step]:
    """The steps ``model`` already went through, as :class:`Step` objects with ``index=None``:
    the report's history, else its older per-method keys, and in any case what its modules show
    (quantized linears, recursive sharing), so a model whose report was lost is still judged."""
    from ..quant.qlinear import QuantLinear

    rep = getattr(model, "effml_report", None)
    rep = rep if isinstance(rep, dict) else {}
    prior = [Step(e["step"], e.get("method") or e["step"], {}, config_dict=e.get("config") or {})
             for e in rep.get("steps", []) if isinstance(e, dict) and "step" in e]
    kinds = {s.kind for s in prior}
    if "prune" not in kinds and isinstance(rep.get("prune"), dict):  # reports written before the history
        cfg = rep["prune"].get("config") or {}
        prior.append(Step("prune", cfg.get("method", "prune"), {}, config_dict=cfg))
    recursive = getattr(model, "effml_recursive", None)
    if "recursify" not in kinds and recursive is not None:
        prior.append(Step("recursify", "recursify", {}, config_dict=recursive.get("config") or {}))
    if "quantize" not in kinds and any(isinstance(m, QuantLinear) for m in model.modules()):
        method = rep.get("method") if isinstance(rep.get("method"), str) else "unknown method"
        prior.append(Step("quantize", method, {}, config_dict=rep.get("config") or {}))
    return prior


def _check_against_model(step: Step, model: nn.Module) -> None:
    """Shape constraints that only the model can tell (none of the steps changes input sizes)."""
    from ..core.arch import get_arch, get_submodule
    from ..core.surgery import iter_linears

    if step.kind == "quantize":
        step.config.check_model(model)
    elif step.kind == "prune" and step.config.nm is not None:
        from ..prune.masks import check_nm_shape

        for ref in iter_linears(model):
            check_nm_shape(ref.module.in_features, step.config.nm[1], ref.name)
    elif step.kind == "recursify":
        from ..recursive.sharing import share_groups

        share_groups(len(get_submodule(model, get_arch(model).layers)), step.config.num_loops, step.config.strategy)


def validate_recipe(recipe, model: nn.Module | None = None, calib=None, *, require_calib: bool = True,
                    defaults: dict | None = None) -> list[Step]:
    """Parse and check every step of ``recipe`` (a list of one-key steps or a .json / .yaml
    path) and return them. Raises :class:`RecipeError` naming the step and the fix on: unknown
    steps or options, invalid values (each method's own config dataclass decides), unsupported
    orders (:mod:`.rules`, including the steps ``model`` already went through), shapes the model
    does not allow (group size, N:M), and missing calibration data when ``require_calib``.
    Warnings (a supported order with a cost) are emitted with :func:`warnings.warn`."""
    raw = read_recipe(recipe)
    steps = [parse_step(i, r, defaults) for i, r in enumerate(raw)]
    if defaults:
        from .recipe import accepted_options

        used = set().union(*(accepted_options(s.kind, s.method) for s in steps))
        unused = sorted(set(defaults) - used)
        if unused:
            raise RecipeError(f"option(s) {unused} apply to no step of this recipe; steps accept {sorted(used)}")
    prior = []
    if model is not None:
        from ..core.arch import get_arch

        get_arch(model)  # an unsupported family fails here, before any step
        prior = model_history(model)
    issues = order_issues(prior + steps)
    errors = [i.message for i in issues if i.level == "error"]
    if errors:
        raise RecipeError("unsupported recipe:\n  - " + "\n  - ".join(errors))
    if model is not None:
        for j, step in enumerate(steps):
            try:
                _check_against_model(step, model)
                if step.kind == "prune" and all(s.kind == "prune" for s in steps[:j]):
                    # the model's zeros now are this step's starting point (later ones depend on
                    # what quantize / recursify make of them, known only when they have run)
                    from ..prune.units import check_not_lower, prunable_units

                    check_not_lower(prunable_units(model), step.config.sparsity)
            except ValueError as e:
                raise RecipeError(f"recipe {step.where}: {e}") from None
        if calib is not None:
            from ..core.validate import check_token_ids

            try:
                check_token_ids(calib, model, what="calib")
            except ValueError as e:
                raise RecipeError(str(e)) from None
    needing = [s.where for s in steps if s.needs_calib]
    if require_calib and needing and calib is None:
        raise RecipeError(f"{', '.join(needing)} need(s) calibration data: pass calib=effml.calibration_data("
                          "tokenizer, n_samples=..., seq_len=...) to effml.compress")
    for issue in issues:
        if issue.level == "warning":
            warnings.warn(issue.message, UserWarning, stacklevel=3)
    return steps
