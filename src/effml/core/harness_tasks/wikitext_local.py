"""Documents and scoring of the ``wikitext2_local`` lm-eval task.

The documents are those of the ``EleutherAI/wikitext_document_level`` set (``wikitext-2-raw-v1``,
test split) that lm-eval's own ``wikitext`` task reads, rebuilt from the local raw file that
:func:`effml.core.data.load_text` finds (``$EFFML_DATA``, ``shared/data``, else the hub):

- a *page* starts at each level-1 heading line `` = Title = `` (that set's loading script: a line
  that, with ``= =`` collapsed to ``==`` and stripped, starts with ``"= "`` and ends with
  ``" ="``) and runs up to the next one, its lines joined with ``"\\n"``;
- effml's copy of the file has the blank lines (``" "``) of the original dropped. They are put
  back by the layout of WikiText: one before and one after every heading, plus one at the end of
  every article. On the intact validation file (3760 lines) this puts back every blank line and
  one too many (59 of its 60 pages come out identical); on the test file it gives 4365 lines for
  the original 4358, so a few documents hold an extra blank line (a newline token, 2 bytes). Word
  counts (lm-eval splits the page on whitespace) are exactly those of the hub documents.

``wikitext_detokenizer`` and ``process_results`` mirror ``lm_eval/tasks/wikitext/
preprocess_wikitext.py`` (MIT licence) line for line; a test checks they agree.
"""

from __future__ import annotations

import re

_HEADING = re.compile(r" (=(?: =)*) .+ \1 ")


def heading_level(line: str) -> int:
    """1 for an article title `` = T = ``, 2 for `` = = S = = ``, ...; 0 for any other line."""
    m = _HEADING.fullmatch(line)
    return m.group(1).count("=") if m else 0


def restore_blank_lines(lines: list[str]) -> list[str]:
    """The file's lines with WikiText's blank lines put back (see the module docstring)."""
    out: list[str] = []
    for line in lines:
        if not line.strip():
            continue
        level = heading_level(line)
        if level:
            if level == 1 and out:
                out.append(" ")  # the blank line that ends the previous article
            out += [" ", line, " "]
        else:
            out.append(line)
    out.append(" ")
    return out


def split_pages(lines: list[str]) -> list[str]:
    """Pages as the ``wikitext_document_level`` loading script cuts them from the file's lines."""
    pages, current = [], []
    for line in lines:
        rline = line.replace("= = =", "===").replace("= =", "==").strip()
        if rline.startswith("= ") and rline.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append(page)
            current = []
        current.append(line)
    pages.append("\n".join(current))
    return pages


def wikitext2_pages(split: str = "test") -> list[str]:
    """The documents of WikiText-2 raw ``split`` (only ``"test"``: effml keeps no raw validation copy)."""
    from effml.core.data import load_text

    if split != "test":
        raise ValueError(f"only the WikiText-2 test split is available locally, not {split!r}")
    text = load_text("wikitext2", "test")  # LF line ends, blank lines dropped
    # the raw file ends with a newline, so its split("\n") ends with ""
    return split_pages(restore_blank_lines(text.split("\n")) + [""])


def wikitext2_test_dataset(**kwargs):
    """``custom_dataset`` of the task: ``{"test": Dataset}`` of ``{"page": str}`` rows.

    lm-eval passes the task's metadata and dataset_kwargs as keyword arguments; none is used.
    """
    import datasets

    return {"test": datasets.Dataset.from_dict({"page": wikitext2_pages("test")})}


# --- mirrored from lm_eval/tasks/wikitext/preprocess_wikitext.py ---------------------------------


def wikitext_detokenizer(doc):
    string = doc["page"]
    # contractions
    string = string.replace("s '", "s'")
    string = re.sub(r"/' [0-9]/", r"/'[0-9]/", string)
    # number separators
    string = string.replace(" @-@ ", "-")
    string = string.replace(" @,@ ", ",")
    string = string.replace(" @.@ ", ".")
    # punctuation
    string = string.replace(" : ", ": ")
    string = string.replace(" ; ", "; ")
    string = string.replace(" . ", ". ")
    string = string.replace(" ! ", "! ")
    string = string.replace(" ? ", "? ")
    string = string.replace(" , ", ", ")
    # double brackets
    string = re.sub(r"\(\s*([^\)]*?)\s*\)", r"(\1)", string)
    string = re.sub(r"\[\s*([^\]]*?)\s*\]", r"[\1]", string)
    string = re.sub(r"{\s*([^}]*?)\s*}", r"{\1}", string)
    string = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', string)
    string = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", string)
    # miscellaneous
    string = string.replace("= = = =", "====")
    string = string.replace("= = =", "===")
    string = string.replace("= =", "==")
    string = string.replace(" " + chr(176) + " ", chr(176))
    string = string.replace(" \n", "\n")
    string = string.replace("\n ", "\n")
    string = string.replace(" N ", " 1 ")
    string = string.replace(" 's", "'s")

    return string


def process_results(doc, results):
    (loglikelihood,) = results
    # IMPORTANT: wikitext counts number of words in *original doc before detokenization*
    _words = len(re.split(r"\s+", doc["page"]))
    _bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, _words),
        "byte_perplexity": (loglikelihood, _bytes),
        "bits_per_byte": (loglikelihood, _bytes),
    }
