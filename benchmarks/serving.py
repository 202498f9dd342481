"""Serving: continuous depth-wise batching (``effml.recursive.Engine``) vs Hugging Face ``generate()``.

    OMP_NUM_THREADS=1 python benchmarks/serving.py --preset cpu
    python benchmarks/serving.py --markdown        # the tables of an existing JSON, for RESULTS.md

One stream of requests (WikiText-2 test prompts of varied length, varied ``max_new_tokens``,
Poisson arrivals) is served by every system on a recursified SmolLM2 (cycle, average init, SVD
LoRA) and the original full-depth model:

* ``hf_sequential``: one ``generate()`` per request, in arrival order;
* ``hf_static``: static batches: whenever the server is free it takes up to ``max_batch``
  requests that have arrived, left-pads them and decodes to the longest ``max_new_tokens`` of
  the batch (rows that are done keep computing, as in static batching);
* ``engine``: the Engine (``max_batch`` slots); on the original model it is plain continuous
  (sequence-wise) batching, on the recursive one continuous depth-wise batching, optionally with
  early exit.

Equal memory: every system gets the same ``max_batch`` and the same KV budget of ``max_tokens``
positions per request (the Engine allocates exactly that; ``generate()``'s cache never exceeds it
because no request needs more). Parameter memory differs (the recursive model is smaller); it
is reported, not converted into extra batch slots.

Time is wall time with a virtual clock: when a system is idle it jumps to the next arrival
instead of sleeping. Throughput = generated tokens / (last finish - first arrival); latency = a
request's finish - its arrival (queueing included). Every request generates exactly its
``max_new_tokens`` (EOS is ignored) so all systems produce the same number of tokens.

Early-exit quality, on the same recursive model: (a) free-running agreement of the early-exit
engine's tokens with the no-exit engine's on the stream above; (b) teacher-forced NLL of WikiText
continuations through the engine (``submit(forced=...)``), which includes the KV-copy policy's
effect on later tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import torch

import effml
from effml.core.data import load_text, random_windows, tokenize_text
from effml.core.table import format_table
from effml.recursive import Engine, parameter_report, recursify

PRESETS = {
    # 2 shared CPU cores, one torch thread: 5-9 minutes in all. Two streams with the same requests:
    # "saturated" arrives faster than any system serves (a backlog: throughput), "light" slower
    # (arrival-bound: latency), the latter only for the batched systems.
    "cpu": dict(loops=2, rank=16, init="average", requests=32, prompt=(8, 64), new=(8, 32),
                streams={"saturated": 0.25, "light": 1.5}, max_batch=8, thresholds=(0.9, 0.6), nll_samples=16,
                nll_prompt=32, nll_forced=32, nll_thresholds=(0.9, 0.7, 0.5)),
    # one GPU (not run yet): long enough prompts and batches for the paper's regime
    "gpu": dict(loops=2, rank=16, init="average", requests=512, prompt=(64, 512), new=(64, 256),
                streams={"saturated": 0.005, "light": 0.05}, max_batch=64, thresholds=(0.9, 0.6), nll_samples=128,
                nll_prompt=256, nll_forced=256, nll_thresholds=(0.9, 0.7, 0.5)),
}
COLUMNS = ["stream", "system", "model", "early_exit", "tokens", "makespan_s", "tok_per_s", "busy_tok_per_s", "p50_s",
           "p90_s", "p99_s", "speedup_vs_orig_static"]


class Clock:
    """Wall time that skips idle gaps: ``wait_until`` advances it without sleeping."""

    def __init__(self):
        self.t0, self.skipped = time.perf_counter(), 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0 + self.skipped

    def wait_until(self, t: float) -> None:
        self.skipped += max(0.0, t - self.now())


def workload(tokens: torch.Tensor, cfg: dict, mean_gap_s: float, seed: int = 0) -> list[dict]:
    """The same prompts and lengths for every ``mean_gap_s`` (the arrival gaps scale with it)."""
    g = torch.Generator().manual_seed(seed)
    n = cfg["requests"]
    windows = random_windows(tokens, n, cfg["prompt"][1], seed)
    lens = torch.randint(cfg["prompt"][0], cfg["prompt"][1] + 1, (n,), generator=g).tolist()
    news = torch.randint(cfg["new"][0], cfg["new"][1] + 1, (n,), generator=g).tolist()
    gaps = torch.empty(n).exponential_(1.0, generator=g) * mean_gap_s
    arrivals = (torch.cumsum(gaps, 0) - gaps[0]).tolist()  # first request at t = 0
    return [{"prompt": windows[i, :lens[i]], "new": news[i], "arrival": arrivals[i]} for i in range(n)]


# --- systems ------------------------------------------------------------------------------------
def run_engine(model, reqs, cfg, early_exit=None) -> dict:
    engine = Engine(model, max_batch=cfg["max_batch"], max_tokens=cfg["max_tokens"], early_exit=early_exit,
                    eos_token_id=None)
    clock, out, nxt = Clock(), {}, 0
    while len(out) < len(reqs):
        while nxt < len(reqs) and reqs[nxt]["arrival"] <= clock.now():
            engine.submit(reqs[nxt]["prompt"], reqs[nxt]["new"])  # ids follow submission order
            nxt += 1
        if not engine.busy:
            clock.wait_until(reqs[nxt]["arrival"])
            continue
        for r in engine.step():
            out[r.id] = {"finish": clock.now(), "tokens": r.tokens, "exit_loops": r.exit_loops}
    return {"requests": [out[i] for i in range(len(reqs))], "clock": clock, "stats": engine.stats.as_dict(),
            "kv_bytes": engine.pool.nbytes}


@torch.no_grad()
def run_hf(model, reqs, cfg, batch: int) -> dict:
    """``batch=1``: sequential generate(); otherwise static batches of up to ``batch``."""
    pad = model.generation_config.pad_token_id
    clock, out, queue, nxt = Clock(), {}, [], 0
    computed = 0
    while len(out) < len(reqs):
        while nxt < len(reqs) and reqs[nxt]["arrival"] <= clock.now():
            queue.append(nxt)
            nxt += 1
        if not queue:
            clock.wait_until(reqs[nxt]["arrival"])
            continue
        group, queue = queue[:batch], queue[batch:]
        width = max(len(reqs[i]["prompt"]) for i in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(group):  # left padding
            p = reqs[i]["prompt"]
            ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
        new = max(reqs[i]["new"] for i in group)
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=pad)
        computed += len(group) * new
        t = clock.now()
        for row, i in enumerate(group):
            out[i] = {"finish": t, "tokens": gen[row, width:width + reqs[i]["new"]].tolist()}
    return {"requests": [out[i] for i in range(len(reqs))], "clock": clock, "computed_tokens": computed}


def summarize(stream: str, name: str, model_name: str, reqs, res, early_exit=None) -> dict:
    lat = torch.tensor([r["finish"] - q["arrival"] for q, r in zip(reqs, res["requests"])])
    tokens = sum(len(r["tokens"]) for r in res["requests"])
    assert tokens == sum(q["new"] for q in reqs), "a system generated a different number of tokens"
    makespan = max(r["finish"] for r in res["requests"]) - reqs[0]["arrival"]
    busy = makespan - res["clock"].skipped
    row = {"stream": stream, "system": name, "model": model_name, "early_exit": early_exit, "tokens": tokens, "makespan_s": makespan,
           "tok_per_s": tokens / makespan, "busy_tok_per_s": tokens / busy,
           "p50_s": float(lat.quantile(0.5)), "p90_s": float(lat.quantile(0.9)), "p99_s": float(lat.quantile(0.99))}
    if "stats" in res:
        s = res["stats"]
        row.update({"engine_" + k: v for k, v in s.items() if k != "exits"}, exits_per_loop=s["exits"],
                   kv_bytes=res["kv_bytes"])
    if "computed_tokens" in res:
        row["computed_tokens"] = res["computed_tokens"]  # static batching decodes every row to the longest
    return row


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    total = sum(len(s) for s in a)
    prefix = [next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b)]
    return {"token_agreement": same / total, "exact_requests": sum(s == t for s, t in zip(a, b)),
            "mean_match_prefix": sum(prefix) / len(prefix)}


# --- early-exit quality: teacher-forced NLL through the engine ------------------------------------
def forced_nll(model, windows: torch.Tensor, cfg: dict, early_exit=None) -> dict:
    n_prompt = cfg["nll_prompt"]
    engine = Engine(model, max_batch=cfg["max_batch"], max_tokens=windows.shape[1], early_exit=early_exit,
                    eos_token_id=None)
    for w in windows:
        engine.submit(w[:n_prompt], windows.shape[1] - n_prompt, forced=w[n_prompt:])
    t0 = time.perf_counter()
    done = sorted(engine.run(), key=lambda r: r.id)
    seconds = time.perf_counter() - t0
    logps = [lp for r in done for lp in r.logprobs[1:]]  # the first token comes from prefill (never exits)
    loops = [j for r in done for j in r.exit_loops[1:]]
    nll = -sum(logps) / len(logps)
    return {"early_exit": early_exit, "nll": nll, "ppl": math.exp(min(nll, 700)), "seconds": seconds,
            "exit_fraction": sum(j < engine.num_loops - 1 for j in loops) / len(loops),
            "predicted": [r.predicted[1:] for r in done], "exits_per_loop": engine.stats.exits,
            "kv_copies": engine.stats.kv_copies}


@torch.no_grad()
def original_nll(model, windows: torch.Tensor, n_prompt: int) -> float:
    logp = torch.log_softmax(model(windows).logits[:, n_prompt:-1].float(), -1)
    return float(-logp.gather(-1, windows[:, n_prompt + 1:, None]).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/serving.json")
    p.add_argument("--markdown", action="store_true", help="only print the tables of an existing --out JSON")
    args = p.parse_args()
    if args.markdown:
        print(markdown_tables(json.loads(Path(args.out).read_text())))
        return
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    cfg = dict(PRESETS[args.preset])
    cfg["max_tokens"] = cfg["prompt"][1] + cfg["new"][1]
    t_start = time.perf_counter()

    original, tok = effml.load_model(args.model, device=args.device)
    for m in (original,):  # fixed lengths: no EOS, and a pad id for left padding
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    rec = recursify(copy.deepcopy(original), num_loops=cfg["loops"], strategy="cycle", init=cfg["init"],
                    lora_rank=cfg["rank"])
    convert_s = time.perf_counter() - t0
    text_ids = tokenize_text(tok, load_text("wikitext2", "test"))
    streams = {tag: workload(text_ids, cfg, gap) for tag, gap in cfg["streams"].items()}
    for reqs in streams.values():
        for q in reqs:
            q["prompt"] = q["prompt"].to(args.device)
    first = next(iter(streams.values()))
    result = {"preset": args.preset, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
              "device": str(args.device), "threads": args.threads, "convert_seconds": convert_s,
              "params_bytes": {"original": _param_bytes(original), "recursive": _param_bytes(rec)},
              "non_embedding_params": {"original": parameter_report(original)["non_embedding"],
                                       "recursive": parameter_report(rec)["non_embedding"]},
              "workload": {"requests": len(first), "prompt_tokens": sum(len(q["prompt"]) for q in first),
                           "new_tokens": sum(q["new"] for q in first),
                           "last_arrival_s": {tag: reqs[-1]["arrival"] for tag, reqs in streams.items()}},
              "rows": []}
    name = f"recursive B={cfg['loops']} r={cfg['rank']}"
    runs = {}

    def record(stream, key, system, model_name, res, early_exit=None):
        runs[stream, key] = res
        row = summarize(stream, system, model_name, streams[stream], res, early_exit)
        result["rows"].append(row)
        print(format_table([row], COLUMNS), flush=True)

    for tag, reqs in streams.items():
        full = tag == "saturated"
        record(tag, "orig_static", "hf_static", "original", run_hf(original, reqs, cfg, cfg["max_batch"]))
        record(tag, "orig_engine", "engine", "original", run_engine(original, reqs, cfg))
        if full:
            record(tag, "rec_seq", "hf_sequential", name, run_hf(rec, reqs, cfg, 1))
        record(tag, "rec_static", "hf_static", name, run_hf(rec, reqs, cfg, cfg["max_batch"]))
        record(tag, "rec_engine", "engine", name, run_engine(rec, reqs, cfg))
        for thr in cfg["thresholds"] if full else ():
            record(tag, f"rec_engine_{thr}", "engine", name, run_engine(rec, reqs, cfg, thr), thr)
        rows = [r for r in result["rows"] if r["stream"] == tag]
        base = next(r for r in rows if r["system"] == "hf_static" and r["model"] == "original")["tok_per_s"]
        for r in rows:
            r["speedup_vs_orig_static"] = r["tok_per_s"] / base

    # correctness on the stream: the no-exit engine against sequential generate(), request by request
    tokens = {k: [r["tokens"] for r in v["requests"]] for k, v in runs.items()}
    result["engine_equals_sequential_generate"] = agreement(tokens["saturated", "rec_engine"],
                                                            tokens["saturated", "rec_seq"])
    result["original_engine_equals_static_generate"] = agreement(tokens["saturated", "orig_engine"],
                                                                 tokens["saturated", "orig_static"])
    result["early_exit_free_running"] = [
        {"early_exit": thr, **agreement(tokens["saturated", f"rec_engine_{thr}"], tokens["saturated", "rec_engine"])}
        for thr in cfg["thresholds"]]

    windows = random_windows(text_ids, cfg["nll_samples"], cfg["nll_prompt"] + cfg["nll_forced"], seed=1)
    windows = windows.to(args.device)
    nll_rows = [forced_nll(rec, windows, cfg)]
    for thr in cfg["nll_thresholds"]:
        nll_rows.append(forced_nll(rec, windows, cfg, thr))
    ref_pred = nll_rows[0]["predicted"]
    for r in nll_rows:
        pred = r.pop("predicted")
        r["argmax_agreement_vs_no_exit"] = agreement(pred, ref_pred)["token_agreement"]
        r["nll_change"] = r["nll"] - nll_rows[0]["nll"]
    result["teacher_forced"] = {"rows": nll_rows, "original_nll": original_nll(original, windows, cfg["nll_prompt"])}
    result["total_seconds"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print()
    print(markdown_tables(result))
    print(f"\nwrote {out} ({result['total_seconds']:.0f} s)")


def _param_bytes(model) -> int:
    return sum(p.nbytes for p in model.parameters())  # shared tensors counted once


def markdown_tables(result: dict) -> str:
    parts = [format_table(result["rows"], COLUMNS, markdown=True)]
    eng = [r for r in result["rows"] if r["system"] == "engine"]
    cols = ["stream", "model", "early_exit", "engine_steps", "engine_mean_rows_per_step", "engine_mixed_steps",
            "engine_prefill_s", "engine_blocks_s", "engine_heads_s", "exits_per_loop", "engine_kv_copies"]
    parts.append("Engine: where the time goes\n\n" + format_table(eng, cols, markdown=True))
    static = [r for r in result["rows"] if "computed_tokens" in r]
    parts.append("Static batching: tokens decoded vs tokens kept\n\n"
                 + format_table(static, ["stream", "system", "model", "tokens", "computed_tokens"], markdown=True))
    parts.append("Early exit, free-running agreement with the no-exit engine\n\n"
                 + format_table(result["early_exit_free_running"], markdown=True))
    tf = result["teacher_forced"]
    parts.append(f"Early exit, teacher-forced NLL of WikiText continuations (original model: "
                 f"{tf['original_nll']:.3f})\n\n" + format_table(tf["rows"], ["early_exit", "nll", "nll_change",
                                                                               "exit_fraction",
                                                                               "argmax_agreement_vs_no_exit",
                                                                               "exits_per_loop", "seconds"],
                                                                 markdown=True))
    mem = {"params_MiB_original": result["params_bytes"]["original"] / 2**20,
           "params_MiB_recursive": result["params_bytes"]["recursive"] / 2**20,
           "kv_MiB_every_system": next(r["kv_bytes"] for r in eng) / 2**20}
    parts.append("Memory\n\n" + format_table([mem], markdown=True))
    parts.append("engine (no exit) vs sequential generate() on the stream: "
                 + json.dumps(result["engine_equals_sequential_generate"]))
    return "\n\n".join(parts)


if __name__ == "__main__":
    main()
