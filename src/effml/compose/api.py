"""``effml.compress(model, recipe, calib)``: validate a whole recipe, then run its steps in order."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .recipe import Step
from .validate import validate_recipe

log = logging.getLogger(__name__)


def run_step(model: nn.Module, step: Step, calib: torch.Tensor | None) -> nn.Module:
    """Call the step's method with exactly the step's options (calib only where it is used)."""
    data = calib if step.needs_calib else None
    if step.kind == "prune":
        from ..prune.api import prune

        return prune(model, calib=data, **step.options)
    if step.kind == "quantize":
        from ..quant.api import quantize

        return quantize(model, calib=data, **step.options)
    from ..recursive.convert import recursify

    return recursify(model, calib=data, **step.options)


def run_steps(model: nn.Module, steps: list[Step], calib: torch.Tensor | None) -> nn.Module:
    for step in steps:
        log.info("recipe step %d/%d: %s %s", step.index + 1, len(steps), step.kind, step.method)
        model = run_step(model, step, calib)
    return model


def compress(model: nn.Module, recipe, calib: torch.Tensor | None = None, **defaults) -> nn.Module:
    """Apply a recipe of prune / quantize / recursify steps to ``model`` in place and return it.

    ``recipe``: a list of one-key steps, e.g. ``[{"prune": {"sparsity": 0.5, "method": "wanda"}},
    {"quantize": {"method": "gptq", "w_bits": 4}}]``, or the path of a ``.json`` / ``.yaml`` file
    holding such a list. Each step takes exactly the keyword options of :func:`effml.prune`,
    :func:`effml.quantize` or :func:`effml.recursify`. ``calib``: ``[n, seq_len]`` token ids for
    the steps that calibrate. ``defaults``: options given to every step that accepts them and
    does not set them itself (``device="cuda"``, ``seed=1``).

    The whole recipe is validated first (see :func:`effml.compose.validate_recipe`), so a bad
    option or an unsupported order fails in seconds. Every step appends to
    ``model.effml_report["steps"]`` (method, config, seconds, measured sparsity, bits, size).
    """
    steps = validate_recipe(recipe, model, calib, defaults=defaults)
    return run_steps(model, steps, calib)
