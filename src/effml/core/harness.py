"""lm-evaluation-harness tasks on an in-memory effml model (the optional ``eval`` extra).

``evaluate_tasks`` wraps the model and tokenizer in lm-eval's ``HFLM`` and runs
``lm_eval.simple_evaluate`` on tasks shipped with effml (``harness_tasks/``), which read effml's
local data and so run offline:

- ``wikitext2_local``: lm-eval's ``wikitext`` task (WikiText-2 raw test split, one document per
  article, rolling loglikelihood over windows of ``max_length`` tokens; word perplexity, byte
  perplexity, bits per byte) on the local ``wiki.test.raw``.

Its word perplexity is not :func:`effml.perplexity`'s number: documents are detokenized, scored
with as much context as ``max_length`` allows, and normalized per word rather than per token.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).with_name("harness_tasks")
_TASK_LINE = re.compile(r"^task:\s*(\S+)\s*$", re.MULTILINE)
_INSTALL = "pip install 'effml[eval]'"


def available_tasks() -> list[str]:
    """Names of the lm-eval tasks shipped with effml."""
    names = []
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        m = _TASK_LINE.search(path.read_text(encoding="utf-8"))
        if m:
            names.append(m.group(1))
    return sorted(names)


def import_lm_eval():
    """``(lm_eval, HFLM, TaskManager)``; ModuleNotFoundError saying what to install if it is missing."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ModuleNotFoundError(
            f"evaluating lm-eval tasks needs lm-evaluation-harness, which is not installed ({e}): {_INSTALL}"
        ) from e
    return lm_eval, HFLM, TaskManager


def check_task_arguments(tasks, limit=None, batch_size=1, max_length=None) -> list[str]:
    """The task names, deduplicated; ValueError for an unknown task or a bad option."""
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    tasks = [t.strip() for t in tasks]
    if not tasks:
        raise ValueError(f"no task given: pass one or more of {available_tasks()}")
    known = available_tasks()
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: the tasks shipped with effml are {known}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of documents or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an integer >= 2 or None (the model's context length), got {max_length!r}")
    return list(dict.fromkeys(tasks))


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 1,
    max_length: int | None = None,
) -> dict[str, dict[str, float]]:
    """Run effml's lm-eval tasks on ``model``; ``{task: {metric: value, ..., "docs": n}}``.

    ``tasks``: names from :func:`available_tasks` (a list, or one comma-separated string).
    ``limit``: evaluate only the first ``limit`` documents of each task. ``max_length``: the
    rolling window in tokens (default: the model's context length, as lm-eval does).

    Raises ModuleNotFoundError (install ``effml[eval]``) when lm-eval is missing and ValueError
    for an unknown task, both before any work.
    """
    lm_eval, HFLM, TaskManager = import_lm_eval()
    tasks = check_task_arguments(tasks, limit, batch_size, max_length)
    if tokenizer is None:
        raise ValueError("evaluate_tasks needs the model's tokenizer")
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    missing = [t for t in tasks if t not in task_manager.all_tasks]
    if missing:  # a YAML that lm-eval could not index
        raise ValueError(f"lm-eval does not find the task(s) {missing} in {TASKS_DIR}")
    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            limit=limit,
            task_manager=task_manager,
            bootstrap_iters=0,
            log_samples=False,
        )
    finally:
        model.train(was_training)
    if out is None:  # only on non-zero ranks of a distributed run
        return {}
    results = {}
    for task in tasks:
        metrics = {}
        for key, value in out["results"][task].items():
            name, _, _ = key.partition(",")
            if name in ("alias", "sample_len") or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            metrics[name] = float(value)
            if not math.isfinite(metrics[name]):
                raise FloatingPointError(f"{task}: {name} is not finite; the model produced NaN/inf logits")
        n = out.get("n-samples", {}).get(task, {})
        metrics["docs"] = int(n.get("effective", n.get("original", 0)))
        results[task] = metrics
    return results
