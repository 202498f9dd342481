"""``effml export``: write a model (an effml folder, HF folder, alias...) as a deployable HF folder."""

from __future__ import annotations

import argparse
import json

from ..cli_common import register_command


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="folder written by effml.save (or alias, HF folder, hub id)")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors", "hf-unrolled"])
    p.add_argument("--kv-cache", default=None, choices=["drop"],
                   help="drop: export a model with an integer KV cache with a float one (the format has none)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the floating-point tensors (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")


def _run(args) -> int:
    import torch

    from ..core import load_model
    from .api import REPORT_FILE, export

    model, tokenizer = load_model(args.model)
    out = export(model, args.out, tokenizer, format=args.format, overwrite=args.overwrite, kv_cache=args.kv_cache,
                 dtype=getattr(torch, args.dtype) if args.dtype else None)
    report = json.loads((out / REPORT_FILE).read_text())
    print(f"exported to {out} ({args.format}, {report['bytes'] / 2**20:.1f} MB)")
    for key in ("schemes", "sparsity", "size_cost"):
        if report.get(key):
            print(f"  {key}: {report[key]}")
    for note in report["notes"]:
        print(f"  note: {note}")
    return 0


register_command("export", "write a model as a compressed-tensors (transformers, vLLM) or unrolled HF folder",
                 _add_arguments, _run)
