"""Continuous depth-wise batching engine: greedy outputs equal HF generate() token for token for
mixed prompt lengths and arrival times; early exit follows its documented KV policy."""

import pytest
import torch
from recursive_helpers import tiny_with_biases

from effml.recursive import Engine, recursify
from effml.recursive.uptrain import exit_logits
from effml.testing import tiny_model


@pytest.fixture(autouse=True)
def one_thread():
    """Decode steps of a few rows gain nothing from a second thread; on shared cores its
    synchronisation made these tests up to 20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


PROMPT_LENS = (3, 11, 7, 20, 5, 9)
NEW_TOKENS = (9, 4, 12, 6, 10, 7)
ARRIVALS = (0, 1, 1, 4, 7, 8)  # engine steps; later arrivals join rows that are mid-token


def prompts(vocab=256, seed=1, lens=PROMPT_LENS):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lens]


def hf_greedy(model, prompt, n, eos=None):
    out = model.generate(prompt[None], max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=model.config.pad_token_id)
    return out[0, len(prompt):].tolist()


def serve(engine, ps, news, arrivals, **kw):
    """Submit request i at engine step arrivals[i]; returns {id: Request} once all are done."""
    done, step = {}, 0
    while len(done) < len(ps):
        for i, a in enumerate(arrivals):
            if a == step:
                engine.submit(ps[i], news[i], **kw)
        for r in engine.step():
            done[r.id] = r
        step += 1
        assert step < 1000, "engine did not finish"
    return done


def recursive(family, loops=2, tie_norms=True, rank=4, **overrides):
    model = tiny_with_biases(family) if family == "qwen2" else tiny_model(family, **overrides)
    return recursify(model, num_loops=loops, strategy="cycle", init="average", lora_rank=rank, tie_norms=tie_norms)


CASES = {
    "llama": dict(family="llama"),
    "llama-grouped-lora": dict(family="llama", lora_backend="torch"),  # per-loop groups instead of concat
    "qwen2-biases": dict(family="qwen2"),  # random tied biases + per-depth bias deltas
    "qwen3-qknorm-foldable": dict(family="qwen3", tie_norms="foldable"),  # per-depth q/k norms
    "gemma2-sliding-softcap": dict(family="gemma2"),  # window 8 < prompts, logit soft-capping
    "gemma3-4loops-untied": dict(family="gemma3_text", loops=4, tie_norms=False),  # sliding+global in one block
    "phi3-fused": dict(family="phi3"),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_engine_equals_generate(case):
    spec = dict(CASES[case])
    backend = spec.pop("lora_backend", "auto")
    model = recursive(**spec)
    ps = prompts()
    want = [hf_greedy(model, p, n) for p, n in zip(ps, NEW_TOKENS)]
    engine = Engine(model, max_batch=4, max_tokens=32, eos_token_id=None, lora_backend=backend)
    got = serve(engine, ps, NEW_TOKENS, ARRIVALS)
    for i in range(len(ps)):
        assert got[i].tokens == want[i], f"request {i}"
        assert got[i].finish_reason == "length"
    # rows at different loops really shared block calls, and the queue was used (6 requests, 4 slots)
    assert engine.stats.mixed_steps > 0
    assert max(r.admit_step - r.submit_step for r in got.values()) > 0
    assert not engine.busy


def test_plain_model_and_slot_reuse():
    """A non-recursive model is one loop of L blocks (ordinary continuous batching); a queued
    request takes a freed slot in the very next step."""
    model = tiny_model("mistral")
    ps = prompts(lens=(4, 6, 5, 8, 3))
    news = (3, 8, 5, 4, 6)
    want = [hf_greedy(model, p, n) for p, n in zip(ps, news)]
    engine = Engine(model, max_batch=2, max_tokens=16, eos_token_id=None)
    for p, n in zip(ps, news):
        engine.submit(p, n)
    got = {r.id: r for r in engine.run()}
    assert [got[i].tokens for i in range(5)] == want
    finishes = sorted(r.finish_step for r in got.values())
    for r in got.values():
        if r.admit_step > 0:  # admitted from the queue: right after some request finished
            assert r.admit_step - 1 in finishes
    assert engine.stats.decode_rows == sum(news) - len(news)  # each non-first token: one row, one step


def test_eos_stops_like_generate():
    model = recursive("llama")
    ps = prompts()
    free = [hf_greedy(model, p, n) for p, n in zip(ps, NEW_TOKENS)]
    eos = free[2][4]  # a token request 2 emits mid-way
    want = [hf_greedy(model, p, n, eos=eos) for p, n in zip(ps, NEW_TOKENS)]
    assert len(want[2]) == 5
    got = serve(Engine(model, max_batch=3, max_tokens=32, eos_token_id=eos), ps, NEW_TOKENS, ARRIVALS)
    assert [got[i].tokens for i in range(len(ps))] == want
    assert got[2].finish_reason == "eos"


def test_teacher_forced_logprobs_equal_a_full_forward():
    model = recursive("llama")
    ps, conts = prompts(lens=(5, 9, 4)), prompts(seed=5, lens=(7, 3, 6))
    engine = Engine(model, max_batch=2, max_tokens=20)
    for p, c in zip(ps, conts):
        engine.submit(p, len(c), forced=c)
    got = {r.id: r for r in engine.run()}
    for i, (p, c) in enumerate(zip(ps, conts)):
        seq = torch.cat([p, c])[None]
        logp = torch.log_softmax(model(seq).logits[0, len(p) - 1:-1].float(), -1)
        want = logp.gather(1, c[:, None])[:, 0]
        assert got[i].tokens == c.tolist()
        torch.testing.assert_close(torch.tensor(got[i].logprobs), want, rtol=1e-4, atol=1e-4)
        assert got[i].predicted == logp.argmax(-1).tolist()


# --- early exit ------------------------------------------------------------------------------------
class ListCache:
    """Reference per-depth KV: concatenation, as a plain HF dynamic cache."""

    def __init__(self, n):
        self.k, self.v = [None] * n, [None] * n

    def update(self, k, v, layer_idx, *args, **kwargs):
        if self.k[layer_idx] is not None:
            k, v = torch.cat([self.k[layer_idx], k], 2), torch.cat([self.v[layer_idx], v], 2)
        self.k[layer_idx], self.v[layer_idx] = k, v
        return k, v


@torch.no_grad()
def early_exit_reference(model, prompt, n, threshold, blocks, loops):
    """Token-by-token decoding with the real depth modules; after loop j < last, exit if the top
    probability >= threshold and copy depth j*K+k's new K/V into every skipped depth j'*K+k."""
    layers, embed, rotary = model.model.layers, model.model.embed_tokens, model.model.rotary_emb
    cache = ListCache(len(layers))
    t = len(prompt)
    h = embed(prompt[None])
    pos = torch.arange(t)[None]
    causal = torch.full((t, t), torch.finfo(h.dtype).min).triu(1)[None, None]
    for layer in layers:
        h = layer(h, attention_mask=causal, position_embeddings=rotary(h, pos), position_ids=pos, cache=cache)
    tok = int(exit_logits(model, h[:, -1:]).argmax())
    out, exits = [tok], []
    while len(out) < n:
        pos = torch.tensor([[t]])
        h = embed(torch.tensor([[tok]]))
        pe = rotary(h, pos)
        for j in range(loops):
            for k in range(blocks):
                h = layers[j * blocks + k](h, attention_mask=None, position_embeddings=pe, position_ids=pos, cache=cache)
            logits = exit_logits(model, h)[0, -1]
            if j < loops - 1 and torch.softmax(logits.float(), -1).max() >= threshold:
                for j2 in range(j + 1, loops):
                    for k in range(blocks):
                        src, dst = j * blocks + k, j2 * blocks + k
                        cache.update(cache.k[src][:, :, -1:], cache.v[src][:, :, -1:], dst)
                break
        exits.append(j)
        tok = int(logits.argmax())
        out.append(tok)
        t += 1
    return out, exits


@pytest.mark.parametrize("threshold", [0.0, 0.75])
def test_early_exit_follows_the_kv_copy_policy(threshold):
    model = recursive("llama", loops=3, num_hidden_layers=6)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # peaked outputs, so confidences spread over (0, 1)
    ps = prompts()
    refs = [early_exit_reference(model, p, n, threshold, 2, 3) for p, n in zip(ps, NEW_TOKENS)]
    engine = Engine(model, max_batch=4, max_tokens=32, early_exit=threshold, eos_token_id=None)
    got = serve(engine, ps, NEW_TOKENS, ARRIVALS)
    for i, (tokens, exits) in enumerate(refs):
        assert got[i].tokens == tokens, f"request {i}"
        assert got[i].exit_loops[1:] == exits
    exits_all = [j for tokens, e in refs for j in e]
    if threshold == 0.0:
        assert set(exits_all) == {0} and engine.stats.exits[1] == 0
    else:  # the policy is exercised at every loop boundary, and some tokens run all loops
        assert set(exits_all) == {0, 1, 2}
        assert engine.stats.kv_copies > 0 and engine.stats.mixed_steps > 0
    no_exit = Engine(model, max_batch=4, max_tokens=32, eos_token_id=None)
    if threshold == 0.0:  # exiting everything changes the output (the test can fail)
        assert [r.tokens for r in serve(no_exit, ps, NEW_TOKENS, ARRIVALS).values()] != [t for t, _ in refs]


# --- errors -------------------------------------------------------------------------------------
def test_bad_models_and_requests_are_rejected():
    for strategy in ("sequence", "middle_cycle"):
        loops = 2 if strategy == "sequence" else 1
        model = recursify(tiny_model("llama"), num_loops=loops, strategy=strategy, init="average")
        with pytest.raises(ValueError, match="strategy='cycle'"):
            Engine(model)
    model = recursive("llama")
    with pytest.raises(ValueError, match="confidence threshold"):
        Engine(model, early_exit=1.5)
    with pytest.raises(ValueError, match="num_loops >= 2"):
        Engine(tiny_model("llama"), early_exit=0.9)
    with pytest.raises(ValueError, match="max_batch"):
        Engine(model, max_batch=0)
    engine = Engine(model, max_batch=2, max_tokens=10)
    with pytest.raises(ValueError, match="max_tokens=10"):
        engine.submit([5] * 8, 3)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([5, 256], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit([5], 0)
    with pytest.raises(ValueError, match="fewer than max_new_tokens"):
        engine.submit([5], 3, forced=[4, 4])
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attention implementation"):
        Engine(model)
    model.config._attn_implementation = "eager"
    model.train()
    with pytest.raises(ValueError, match="eval"):
        Engine(model)


@pytest.mark.real_model
def test_recursified_smollm2_equals_generate(smollm2):
    model, tok = smollm2
    # standard LoRA init (no SVD: quick) with B made non-zero, so every depth's LoRA changes the output
    recursify(model, num_loops=3, strategy="cycle", init="average", lora_rank=8, lora_init="zero")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    texts = ["The capital of France is", "Water boils at", "def add(a, b):", "Once upon a time, in a small village"]
    ps = [torch.tensor(tok(t)["input_ids"]) for t in texts]
    news = (8, 6, 10, 7)
    want = [hf_greedy(model, p, n) for p, n in zip(ps, news)]
    engine = Engine(model, max_batch=3, max_tokens=32, eos_token_id=None)
    got = serve(engine, ps, news, (0, 1, 2, 4))
    assert [got[i].tokens for i in range(len(ps))] == want
    assert engine.stats.mixed_steps > 0
