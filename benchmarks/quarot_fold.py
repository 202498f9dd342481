"""QuaRot with and without norm folding against RTN, on a short text (issue 19's Gemma-3 check).

    python benchmarks/quarot_fold.py --model gemma3-270m      # or smollm2-135m

Perplexity on the first ``--windows`` x ``--seq-len`` WikiText-2 test tokens (the first 20,000
characters), each setting on a fresh copy of the model. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import effml
from effml.core.data import load_text
from effml.core.table import format_table

SETTINGS = {
    "rotation only 16-bit": ("quarot", {"w_bits": 16}),
    "quarot W4A16 folded": ("quarot", {"w_bits": 4, "fold_norms": True}),
    "quarot W4A16": ("quarot", {"w_bits": 4}),
    "rtn W4A16": ("rtn", {"w_bits": 4}),
    "quarot W16A4 folded": ("quarot", {"w_bits": 16, "a_bits": 4, "fold_norms": True}),
    "folded, no rotation W16A4": ("quarot", {"w_bits": 16, "a_bits": 4, "fold_norms": True, "rotate": False}),
    "rtn W16A4": ("rtn", {"w_bits": 16, "a_bits": 4}),
    "rtn W4A4KV4": ("rtn", {"w_bits": 4, "a_bits": 4, "kv_bits": 4}),
    "quarot W4A4KV4": ("quarot", {"w_bits": 4, "a_bits": 4, "kv_bits": 4}),
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--out", default="benchmarks/results/quarot_fold.json")
    args = ap.parse_args(argv)
    model, tok = effml.load_model(args.model)
    ids = tok(load_text("wikitext2", "test")[:20000], return_tensors="pt").input_ids[0][: args.windows * args.seq_len]
    rows = [{"setting": "fp", "ppl": round(effml.perplexity(model, tok, ids, seq_len=args.seq_len, progress=False), 3)}]
    for name in args.settings:
        method, kw = SETTINGS[name]
        m = copy.deepcopy(model)
        start = time.perf_counter()
        effml.quantize(m, method=method, **kw)
        ppl = effml.perplexity(m, tok, ids, seq_len=args.seq_len, progress=False)
        rows.append({"setting": name, "ppl": round(ppl, 3), "seconds": round(time.perf_counter() - start, 1)})
        print(rows[-1], flush=True)
        del m
    print(format_table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "windows": args.windows, "seq_len": args.seq_len,
                                          "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
