"""Recipes: a list of one-key steps (``[{"prune": {...}}, {"quantize": {...}}]``), given inline or
as a JSON / YAML file, parsed into :class:`Step` objects whose options are validated by building
each method's own config dataclass (so a recipe accepts exactly what the method accepts)."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.report import STEP_KINDS


class RecipeError(ValueError):
    """A recipe that cannot run as written; the message names the step and the fix."""


@dataclass
class Step:
    """One step of a recipe. ``options``: the keyword arguments the method is called with;
    ``config``: the method's validated config dataclass built from them; ``index``: position in
    the recipe (None for a step read from a model's own history)."""

    kind: str
    method: str
    options: dict[str, Any]
    config: Any = None
    index: int | None = None
    needs_calib: bool = False
    config_dict: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        what = self.kind if self.method == self.kind else f"{self.kind} {self.method}"
        if self.index is None:
            return f"the model's earlier {self.kind}" + ("" if self.method == self.kind else f" ({self.method})")
        return f"step {self.index} ({what})"


def read_recipe(recipe) -> list:
    """The raw list of steps from a list, or a ``.json`` / ``.yaml`` / ``.yml`` file path."""
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist: pass a .json or .yaml file or a list of steps")
        suffix = path.suffix.lower()
        text = path.read_text()
        if suffix == ".json":
            try:
                recipe = json.loads(text)
            except json.JSONDecodeError as e:
                raise RecipeError(f"recipe file {path} is not valid JSON: {e}") from None
        elif suffix in (".yaml", ".yml"):
            import yaml  # a dependency of transformers and datasets, hence always installed

            try:
                recipe = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from None
        else:
            raise RecipeError(f"recipe file {path}: use a .json, .yaml or .yml file")
    if not isinstance(recipe, (list, tuple)) or not recipe:
        raise RecipeError(
            "a recipe is a non-empty list of steps, each a one-key mapping such as "
            '[{"prune": {"sparsity": 0.5}}, {"quantize": {"method": "gptq"}}]'
        )
    return list(recipe)


def _signature_options(fn, skip=("model", "calib")) -> dict[str, Any]:
    """Keyword options of ``fn`` -> default (``inspect.Parameter.empty`` when required)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.kind in kinds and n not in skip}


def _with_defaults(kind: str, given: dict, named: dict, extra: tuple[str, ...] = ()) -> dict:
    """``named`` defaults overridden by ``given``; unknown or missing options raise."""
    unknown = sorted(set(given) - set(named) - set(extra))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; {kind} accepts {sorted(set(named) | set(extra))}")
    merged = {n: d for n, d in named.items() if d is not inspect.Parameter.empty} | given
    missing = [n for n in named if n not in merged]
    if missing:
        raise ValueError(f"missing required option(s) {missing}")
    return merged


def _prune_step(opts: dict) -> Step:
    from ..prune.api import prune
    from ..prune.config import PruneConfig

    names = [f.name for f in fields(PruneConfig)]
    merged = _with_defaults("prune", opts, _signature_options(prune), tuple(names))
    cfg = PruneConfig(**{k: v for k, v in merged.items() if k in names})
    return Step("prune", cfg.method, opts, cfg, needs_calib=cfg.needs_data, config_dict=cfg.to_dict())


# quantize methods that calibrate whatever their weight quantizer; the others need data only for
# GPTQ weights ("rtn" always rounds)
_QUANT_CALIBRATES = ("smoothquant", "flatquant")


def quant_needs_calib(method: str, cfg) -> bool:
    if method in _QUANT_CALIBRATES:
        return True
    gptq_weights = method == "gptq" or (method != "rtn" and cfg.weight_quantizer == "gptq")
    return gptq_weights and cfg.w_bits < 16


def _quantize_step(opts: dict) -> Step:
    from dataclasses import asdict

    from ..quant.api import method_config, quantize

    named = _signature_options(quantize)
    method = opts.get("method", named["method"])
    cfg_cls = type(method_config(method))  # unknown method: a clear error listing the methods
    merged = _with_defaults("quantize", opts, named, tuple(cfg_cls.field_names()))
    cfg = method_config(**merged)
    return Step("quantize", method, opts, cfg, needs_calib=quant_needs_calib(method, cfg), config_dict=asdict(cfg))


def _recursify_step(opts: dict) -> Step:
    from ..recursive.config import RecursiveConfig
    from ..recursive.convert import recursify

    m = _with_defaults("recursify", opts, _signature_options(recursify))
    cfg = RecursiveConfig(m["num_loops"], m["strategy"], m["init"], m["lora_rank"], m["lora_init"],
                          tuple(m["lora_targets"]), m["tie_norms"], m["seed"])
    needs = cfg.lora_init == "asvd" and cfg.relaxed and m.get("grams") is None
    return Step("recursify", "recursify", opts, cfg, needs_calib=needs, config_dict=cfg.to_dict())


_BUILDERS = {"prune": _prune_step, "quantize": _quantize_step, "recursify": _recursify_step}


def accepted_options(kind: str, method: str | None = None) -> set[str]:
    """Keyword options a ``kind`` step accepts (for quantize: with ``method``'s config)."""
    if kind == "prune":
        from ..prune.api import prune
        from ..prune.config import PruneConfig

        return set(_signature_options(prune)) | {f.name for f in fields(PruneConfig)}
    if kind == "quantize":
        from ..quant.api import method_config, quantize

        named = _signature_options(quantize)
        return set(named) | set(type(method_config(method or named["method"])).field_names())
    from ..recursive.convert import recursify

    return set(_signature_options(recursify))


def parse_step(index: int, raw, defaults: dict | None = None) -> Step:
    """One validated step; ``defaults`` fill the options this kind of step accepts and the
    step does not set (``effml.compress(..., device="cuda")``)."""
    if not isinstance(raw, dict) or len(raw) != 1:
        raise RecipeError(f"recipe step {index}: each step is a mapping with one key, one of {STEP_KINDS}, "
                          f'e.g. {{"prune": {{"sparsity": 0.5}}}}; got {raw!r}')
    (kind, opts), = raw.items()
    if kind not in _BUILDERS:
        raise RecipeError(f"recipe step {index}: unknown step {kind!r}; steps are {STEP_KINDS}")
    opts = {} if opts is None else opts
    if not isinstance(opts, dict):
        raise RecipeError(f"recipe step {index} ({kind}): options must be a mapping of keyword arguments, got {opts!r}")
    if "calib" in opts or "model" in opts:
        raise RecipeError(f"recipe step {index} ({kind}): pass calib= to effml.compress, not inside a step")
    try:
        if defaults:
            allowed = accepted_options(kind, opts.get("method"))
            opts = {k: v for k, v in defaults.items() if k in allowed} | opts
        step = _BUILDERS[kind](dict(opts))
    except (ValueError, TypeError) as e:
        raise RecipeError(f"recipe step {index} ({kind}): {e}") from None
    step.index = index
    return step
