"""``effml quantize``: quantize a model, optionally evaluate it, and save it."""

from __future__ import annotations

import argparse

from ..cli_common import (
    add_eval_arguments,
    add_model_arguments,
    evaluate_row,
    load_from_args,
    print_rows,
    register_command,
)
from .api import methods


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_eval_arguments(p)
    p.add_argument("--method", default="rtn", choices=methods())
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--a-bits", type=int, default=16)
    p.add_argument("--kv-bits", type=int, default=16)
    p.add_argument("--group-size", type=int, default=None, help="weight group size (default: per channel)")
    p.add_argument("--weight-quantizer", choices=["rtn", "gptq"], default=None,
                   help="weights of transform methods (quarot, flatquant, smoothquant)")
    p.add_argument("--preset", default=None, help="FlatQuant preset: cpu or paper")
    p.add_argument("--epochs", type=int, default=None, help="FlatQuant epochs per block")
    p.add_argument("--n-samples", type=int, default=None, help="calibration windows")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibration window length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="save the quantized model to this folder")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity evaluation")


def _run(args) -> int:
    import effml

    from .api import method_config, quantize

    options = {"seed": args.seed}
    for key, value in (("group_size", args.group_size), ("weight_quantizer", args.weight_quantizer),
                       ("preset", args.preset), ("epochs", args.epochs), ("n_samples", args.n_samples),
                       ("seq_len", args.calib_seq_len)):
        if value is not None:
            options[key] = value
    # validate everything before the slow model load
    cfg = method_config(args.method, w_bits=args.w_bits, a_bits=args.a_bits, kv_bits=args.kv_bits, **options)
    model, tok = load_from_args(args)
    needs_calib = args.method in ("gptq", "smoothquant", "flatquant") or cfg.weight_quantizer == "gptq"
    calib = effml.calibration_data(tok, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed) if needs_calib else None
    quantize(model, args.method, args.w_bits, args.a_bits, args.kv_bits, calib=calib, device=args.device, **options)
    report = model.effml_report
    print(f"quantized with {args.method} in {report['calibration_time_s']:.1f}s; decoder linears stored at "
          f"{report['linear_bits_per_weight']} bits per weight")
    if args.out:
        from pathlib import Path

        path = effml.save(model, args.out, tokenizer=tok)
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
        print(f"saved to {args.out} ({size / 2**20:.1f} MiB of tensors; embeddings and lm_head stay float)")
    if not args.no_eval:
        print_rows([evaluate_row(f"{args.model} {args.method} w{args.w_bits}a{args.a_bits}kv{args.kv_bits}",
                                 model, tok, args)], args)
    return 0


register_command("quantize", "quantize weights, activations and the KV cache", _add_arguments, _run)
