"""Why QuaRot-RTN (and SmoothQuant) W4A16 are worse than plain RTN W4A16 on SmolLM2-135M:
ablate the MSE weight-clipping search and the rotation (norm folding alone) of QuaRot-RTN.

    OMP_NUM_THREADS=1 python benchmarks/quant_ablation.py

Perplexity on the first 16 windows of WikiText-2 test (seq 1024); writes
benchmarks/results/quant_ablation.json. The full rows (RTN, QuaRot-RTN W4A16) are in quant.py's grid.
"""

import copy
import json
from pathlib import Path

import torch

import effml
from effml.core.table import format_table
from effml.quant import quantize

VARIANTS = [  # (row, method, options) at W4A16
    ("rtn w_mse=True", "rtn", {"w_mse": True}),
    ("quarot rotate=False (norms folded, w_mse=True)", "quarot", {"rotate": False}),
    ("quarot w_mse=False", "quarot", {"w_mse": False}),
]


def main() -> None:
    torch.set_num_threads(1)
    base, tok = effml.load_model("smollm2-135m")
    rows = []
    for name, method, kw in VARIANTS:
        m = copy.deepcopy(base)
        quantize(m, method, w_bits=4, a_bits=16, kv_bits=16, **kw)
        rows.append({"row": name, "ppl": round(effml.perplexity(m, tok, seq_len=1024, max_windows=16, progress=False), 3)})
        print(format_table(rows[-1:]), flush=True)
    out = Path("benchmarks/results/quant_ablation.json")
    out.write_text(json.dumps({"windows": 16, "seq_len": 1024, "w_bits": 4, "a_bits": 16, "rows": rows}, indent=1))
    print(format_table(rows))


if __name__ == "__main__":
    main()
