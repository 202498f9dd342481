"""Text sources for calibration and evaluation.

Named sets (``"wikitext2"``, ``"c4"``) come from a local copy when one exists (``$EFFML_DATA``,
else a ``shared/data`` folder beside the checkout or the working directory), otherwise from the
hub through ``datasets``. Calibration uses the WikiText-2 *validation* split and evaluation the
*test* split, so they never share text.

The WikiText text is the split's lines as they stand in the raw file, with LF line ends. The hub
copy holds the same lines as rows plus empty rows for blank lines; those are dropped so both
sources give identical text. (The GPTQ scripts instead join rows with blank lines, which adds
newline tokens and shifts perplexity by about 1% on SmolLM2.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

NAMED_SOURCES = ("wikitext2", "c4")
_LOCAL_FILES = {
    ("wikitext2", "test"): "wikitext2/wiki.test.raw",
    ("wikitext2", "calib"): "wikitext2/wiki.valid.tokens",
}
_HUB = {
    ("wikitext2", "test"): ("wikitext", "wikitext-2-raw-v1", "test", None),
    ("wikitext2", "calib"): ("wikitext", "wikitext-2-v1", "validation", None),
    ("c4", "test"): ("allenai/c4", "en", "validation", "en/c4-validation.00000-of-00008.json.gz"),
    ("c4", "calib"): ("allenai/c4", "en", "train", "en/c4-train.00000-of-01024.json.gz"),
}


class DataUnavailableError(RuntimeError):
    pass


def data_dirs() -> list[Path]:
    """Folders searched for local copies of the named sets, in order."""
    dirs = []
    if os.environ.get("EFFML_DATA"):
        dirs.append(Path(os.environ["EFFML_DATA"]))
    here = Path(__file__).resolve()
    # a source checkout: <root>/src/effml/core/data.py with shared/ beside <root>
    for base in (Path.cwd(), here.parents[3] if len(here.parents) > 3 else None):
        if base is not None:
            dirs += [base / "../shared/data", base / "shared/data"]
    return [d.resolve() for d in dirs]


def _documents_to_text(docs: Sequence[str]) -> str:
    return "\n\n".join(docs)


def _read_text_file(path: Path) -> str:
    return path.read_bytes().decode("utf-8").replace("\r\n", "\n")


def _load_hub(name: str, split: str) -> str:
    repo, config, hub_split, data_file = _HUB[(name, split)]
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a hard dependency
        raise DataUnavailableError("the `datasets` package is needed to fetch from the hub: pip install datasets") from e
    if data_file is not None:
        ds = datasets.load_dataset(repo, data_files={hub_split: data_file}, split=hub_split)
    else:
        ds = datasets.load_dataset(repo, config, split=hub_split)
    rows = ds["text"]
    if name == "c4":
        return _documents_to_text(rows[:5000])  # ~2M tokens of a ~350k-document shard: plenty for windows
    # wikitext rows are the file's lines with their newline, blank lines as "": concatenating
    # them gives the same text as the local copy (whose blank lines are already dropped)
    return "".join(rows)


# suffixes that mark a one-word string as a file name rather than text to evaluate
_FILE_SUFFIXES = (".txt", ".raw", ".tokens", ".text", ".md", ".json", ".jsonl", ".csv")


def text_source_kind(source: str) -> str:
    """How a text-source string is read, by one explicit rule, in this order:

    1. ``"file"``: it names an existing file, whose text is used;
    2. ``"named"``: it is a known set name (``NAMED_SOURCES``: wikitext2, c4);
    3. ``"literal"``: anything else is the text itself.

    A single word that looks like a file path (contains a slash or ends in .txt, .raw, ...) but
    names no file raises FileNotFoundError rather than being evaluated as its own text.
    """
    if not isinstance(source, str):
        raise TypeError(f"a text source must be a string, got {type(source).__name__}")
    try:
        if Path(source).expanduser().is_file():
            return "file"
    except (OSError, ValueError):  # too long for a path, or holds NUL: text, not a file name
        pass
    if source in NAMED_SOURCES:
        return "named"
    word = source.strip()
    if word and len(word.split()) == 1 and ("/" in word or "\\" in word or word.lower().endswith(_FILE_SUFFIXES)):
        raise FileNotFoundError(
            f"no such text file: {source!r}. Pass an existing file, one of {NAMED_SOURCES}, or the text itself"
        )
    return "literal"


@lru_cache(maxsize=8)
def load_text(source: str, split: str = "test") -> str:
    """The text of a local file or a named set (:func:`text_source_kind` rules 1 and 2)."""
    if split not in ("test", "calib"):
        raise ValueError(f"split must be 'test' or 'calib', got {split!r}")
    kind = text_source_kind(source)
    if kind == "file":
        return _read_text_file(Path(source).expanduser())
    if kind == "literal":
        raise ValueError(
            f"unknown text source {source!r}: use one of {NAMED_SOURCES}, a path to a text file, "
            "a list of strings, or 'self' (text sampled from the model itself)"
        )
    rel = _LOCAL_FILES.get((source, split))
    if rel is not None:
        for d in data_dirs():
            if (d / rel).is_file():
                log.info("reading %s/%s from %s", source, split, d / rel)
                return _read_text_file(d / rel)
    try:
        return _load_hub(source, split)
    except DataUnavailableError:
        raise
    except Exception as e:  # offline, hub down, dataset renamed
        searched = ", ".join(str(d) for d in data_dirs()) or "(none)"
        raise DataUnavailableError(
            f"could not load {source!r} ({split}) from the hub ({type(e).__name__}: {e}) and found no local copy. "
            f"Either set EFFML_DATA to a folder laid out like shared/data (searched: {searched}), pass a path to a "
            "local text file or a list of strings, or use source='self' for data-free calibration."
        ) from e


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """1-D LongTensor of the whole text's token ids (tokenized in chunks of lines for speed)."""
    return _tokenize_cached(tokenizer, text)


@lru_cache(maxsize=8)
def _tokenize_cached(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids[0]
    return ids.long()


def random_windows(tokens: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    if tokens.numel() <= seq_len:
        raise ValueError(
            f"seq_len={seq_len} is longer than the text ({tokens.numel()} tokens): use a shorter seq_len or more text"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def sample_from_model(model, n_samples: int, seq_len: int, seed: int, batch_size: int = 8, top_k: int = 50) -> torch.Tensor:
    """Data-free calibration (LLM-QAT): sequences the model writes itself from its BOS token."""
    config = model.config
    start = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if start is None:
        raise ValueError("'self' calibration needs a model with a bos_token_id or eos_token_id in its config")
    device = next(model.parameters()).device
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i in range(0, n_samples, batch_size):
            n = min(batch_size, n_samples - i)
            prompt = torch.full((n, 1), start, dtype=torch.long, device=device)
            seq = model.generate(
                prompt, do_sample=True, top_k=top_k, max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1,
                pad_token_id=start, attention_mask=torch.ones_like(prompt),
            )
            out.append(seq[:, :seq_len].cpu())
    return torch.cat(out)


def calibration_data(
    tokenizer,
    source: str | Sequence[str] = "wikitext2",
    n_samples: int = 128,
    seq_len: int = 2048,
    seed: int = 0,
    model=None,
) -> torch.Tensor:
    """``[n_samples, seq_len]`` token windows for calibration, deterministic by ``seed``.

    ``source``: ``"wikitext2"`` (validation split), ``"c4"`` (train shard), a text file path, a
    list of strings, or ``"self"`` (sampled from ``model``; needs no data at all).
    """
    if isinstance(source, str) and source == "self":
        if model is None:
            raise ValueError("source='self' samples calibration text from the model: pass model=...")
        return sample_from_model(model, n_samples, seq_len, seed)
    if isinstance(source, str):
        text = load_text(source, "calib")
    elif isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        text = _documents_to_text(list(source))
    else:
        raise TypeError(f"source must be a name, a path, a list of strings or 'self', got {type(source).__name__}")
    return random_windows(tokenize_text(tokenizer, text), n_samples, seq_len, seed)
