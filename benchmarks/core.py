"""Foundation checks with numbers: the calibration engine and perplexity on every family, and
the FP32 perplexity of the default model.

    python benchmarks/core.py                 # tiny-model checks + SmolLM2 on the first 16 windows
    python benchmarks/core.py --all-windows   # also the whole WikiText-2 test split (~300 windows)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import effml
from effml.core import logits_from_hidden, run_layerwise
from effml.core.table import format_table
from effml.testing import FAMILIES, random_ids, tiny_model


def plain_perplexity(model, tokens: torch.Tensor, seq_len: int) -> float:
    n = tokens.numel() // seq_len
    nll = 0.0
    with torch.no_grad():
        for i in range(n):
            w = tokens[i * seq_len : (i + 1) * seq_len]
            nll += F.cross_entropy(model(input_ids=w[None]).logits[0, :-1], w[1:]).item()
    return math.exp(nll / n)


def family_rows() -> list[dict]:
    rows = []
    for fam in FAMILIES:
        model = tiny_model(fam)
        ids = random_ids(model, n=4, seq_len=32)
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        out = run_layerwise(model, ids, lambda ctx: None, batch_size=2)
        diff = (logits_from_hidden(model, ids, torch.cat(out)) - ref).abs().max().item()
        tokens = torch.randint(3, model.config.vocab_size, (32 * 6,), generator=torch.Generator().manual_seed(0))
        ppl = effml.perplexity(model, text=tokens, seq_len=32, progress=False)
        rows.append({"family": fam, "engine_max_abs_logit_diff": diff, "ppl_effml": ppl,
                     "ppl_plain_torch": plain_perplexity(model, tokens, 32),
                     "ppl_rel_diff": abs(ppl / plain_perplexity(model, tokens, 32) - 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--all-windows", action="store_true")
    p.add_argument("--out", default="benchmarks/results/core.json")
    args = p.parse_args()

    fam = family_rows()
    print(format_table(fam))
    model, tok = effml.load_model(args.model)
    ppl_rows = []
    for windows in [4, args.windows] + ([None] if args.all_windows else []):
        t = time.perf_counter()
        ppl = effml.perplexity(model, tok, seq_len=args.seq_len, max_windows=windows)
        ppl_rows.append({"model": args.model, "seq_len": args.seq_len, "windows": windows or "all",
                         "ppl": ppl, "seconds": time.perf_counter() - t})
    print(format_table(ppl_rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"families": fam, "perplexity": ppl_rows}, indent=2))


if __name__ == "__main__":
    main()
