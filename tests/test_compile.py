"""A decode step that compiles: the static hybrid cache under `torch.compile(fullgraph=True, dynamic=False)`.

Each decode below runs past the ring's wrap (W=8, 30 new tokens) with left-padded rows; after two warm-up steps
dynamo is told to fail on any recompilation, so a per-step Python value that entered the step fails the test.
The reference is the eager `HybridCache`, whose decode path is independent of the static one (its own slot
layout, host-side flags and slicing); the full model with transformers' `StaticCache` through the same harness
is the harness's own control."""
from __future__ import annotations

import pytest
import torch
from transformers import CompileConfig, StaticCache

from lt_train import HybridCache, HybridConfig, convert_to_hybrid
from lt_train.eval.sampling import GenSettings, generate_batch
from lt_train.models import tiny_model, tiny_tokenizer

B, P, N, S, W = 3, 12, 30, 2, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (B, P), generator=g)
    am = torch.ones(B, P, dtype=torch.long)
    am[1, :3] = 0
    am[2, :5] = 0
    return ids, am


def _step(model, tok, mask, pos, cache):
    return model(tok, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits[:, -1]


@torch.no_grad()
def _decode(model, cache, step, static: bool, warmup: int = 2, inputs=None):
    """Greedy tokens of a prefill + N - 1 decode steps; with `static`, the mask covers every slot of the cache."""
    ids, am = inputs or _inputs()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    tok = model(ids, attention_mask=am, position_ids=pos, cache=cache, use_cache=True).logits[:, -1].argmax(-1, True)
    toks, mask, last = [tok], torch.cat([am, am.new_zeros(B, N)], 1), pos[:, -1:]
    for s in range(N - 1):
        mask[:, P + s] = 1
        last = last + 1
        with torch._dynamo.config.patch(error_on_recompile=s >= warmup):
            logits = step(model, tok, mask if static else mask[:, : P + s + 1], last, cache)
        tok = logits.argmax(-1, keepdim=True)
        toks.append(tok)
    return torch.cat(toks, 1)


def _hybrid(arch):
    torch.manual_seed(0)
    return convert_to_hybrid(tiny_model(arch, num_layers=4).eval(), HybridConfig([1, 3], S, W))


def _compiled():
    return torch.compile(_step, fullgraph=True, dynamic=False)


@pytest.mark.parametrize("arch", ["llama", pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("qwen3", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_compiled_hybrid_decode_equals_eager_without_recompiling(arch):
    model = _hybrid(arch)
    eager = _decode(model, HybridCache(model.config, max_cache_len=P + N), _step, static=False)
    static_eager = _decode(model, HybridCache(model.config, max_cache_len=P + N, static=True), _step, static=True)
    compiled = _decode(model, HybridCache(model.config, max_cache_len=P + N, static=True), _compiled(), static=True)
    assert torch.equal(static_eager, eager)
    assert torch.equal(compiled, eager)


def test_harness_control_static_full_model():
    torch.manual_seed(0)
    model = tiny_model("llama", num_layers=4).eval()
    eager = _decode(model, StaticCache(config=model.config, max_cache_len=P + N), _step, static=True)
    compiled = _decode(model, StaticCache(config=model.config, max_cache_len=P + N), _compiled(), static=True)
    assert torch.equal(compiled, eager)


def test_generate_compile_config_uses_a_static_cache_and_one_graph():
    model = _hybrid("llama")
    ids, am = _inputs()
    ref = model.generate(ids, attention_mask=am, max_new_tokens=N, do_sample=False, pad_token_id=0)
    cc = CompileConfig(fullgraph=True, dynamic=False, mode="default")
    cc._compile_all_devices = True  # transformers compiles on CPU only when told
    from torch._dynamo.utils import counters

    counters.clear()
    out = model.generate(ids, attention_mask=am, max_new_tokens=N, do_sample=False, pad_token_id=0,
                         compile_config=cc)
    assert torch.equal(out, ref)
    assert counters["stats"]["unique_graphs"] == 1


def test_evaluator_compiled_decode_equals_eager():
    tok = tiny_tokenizer()
    model = _hybrid("llama")
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in ("1+1?", "what is two times three, please?", "x")]
    kw = dict(n_samples=1, greedy=True, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=20, batch_size=3,
              seed=0, instruction=None, system_prompt=None)
    eager = generate_batch(model, tok, prompts, GenSettings(**kw), [0, 1, 2])
    compiled = generate_batch(model, tok, prompts, GenSettings(**kw, compile=True), [0, 1, 2])
    assert compiled.texts == eager.texts and compiled.tokens == eager.tokens
    assert compiled.finished == eager.finished


def test_static_cache_bad_input():
    model = _hybrid("llama")
    ids, am = _inputs()
    with pytest.raises(ValueError, match="needs max_cache_len"):
        HybridCache(model.config, static=True)
    cache = HybridCache(model.config, max_cache_len=P - 1, static=True)
    with pytest.raises(ValueError, match=f"holds {P - 1} tokens"):
        model(ids, attention_mask=am, cache=cache, use_cache=True)
    cache = HybridCache(model.config, max_cache_len=P + N, static=True)
    model(ids, attention_mask=am, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="sized for batch 3"):
        model(ids[:, :1].repeat(4, 1), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="fewer than prompt"):
        model.generate(ids, attention_mask=am, max_new_tokens=N, do_sample=False, pad_token_id=0,
                       cache=HybridCache(model.config, max_cache_len=P + N - 1, static=True))
    online = convert_to_hybrid(tiny_model("llama", num_layers=4).eval(),
                               HybridConfig([], S, W, online_num_lazy=2))
    with pytest.raises(ValueError, match="online selection"):
        online.generate(ids, attention_mask=am, max_new_tokens=4, compile_config=CompileConfig())


def test_evaluator_says_when_the_decode_step_cannot_compile(monkeypatch):
    def broken(fn, **kw):
        def call(*a, **k):
            raise torch._dynamo.exc.Unsupported("a graph break")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    tok = tiny_tokenizer()
    model = _hybrid("llama")
    kw = dict(n_samples=1, greedy=True, temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=4, batch_size=1,
              seed=0, instruction=None, system_prompt=None, compile=True)
    with pytest.raises(RuntimeError, match="could not compile the decode step.*eval.compile=false"):
        generate_batch(model, tok, ["hi"], GenSettings(**kw), [0])


def test_generate_static_cache_implementation_builds_the_static_hybrid_cache():
    """transformers' recipe for a compiled decode, `cache_implementation="static"`, gets the static hybrid cache
    (its own StaticCache would hand the lazy layers a buffer they cannot read): same tokens as the default."""
    model = _hybrid("llama")
    ids, am = _inputs()
    ref = model.generate(ids, attention_mask=am, max_new_tokens=N, do_sample=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=am, max_new_tokens=N, do_sample=False, pad_token_id=0,
                         cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(out.sequences, ref)
    assert getattr(out.cache, "static", False) and out.cache.max_cache_len % 256 == 0
    with pytest.raises(ValueError, match="not supported by a hybrid model"):
        model.generate(ids, attention_mask=am, max_new_tokens=2, cache_implementation="offloaded")


@torch.no_grad()
def test_compiled_decode_short_rows_and_a_window_longer_than_the_cache():
    """Rows with fewer real tokens than S (their sinks fill during decode) and W beyond the cache's length."""
    torch.manual_seed(0)
    model = convert_to_hybrid(tiny_model("qwen2", num_layers=4).eval(), HybridConfig([0, 2], 4, 64))
    ids, am = _inputs()
    am[2, :P - 2] = 0  # two real tokens
    eager = _decode(model, HybridCache(model.config, max_cache_len=P + N), _step, False, inputs=(ids, am))
    compiled = _decode(model, HybridCache(model.config, max_cache_len=P + N, static=True), _compiled(), True,
                       inputs=(ids, am))
    assert torch.equal(compiled, eager)
