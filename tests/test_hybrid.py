"""Conversion and generation on tiny random Llama / Qwen2 / Qwen3 / Mistral models, against a reference model
whose attention is the dense masked softmax of tests/reference.py."""
import copy
import sys
import types

import pytest
import torch

from lt_train import HybridCache, HybridConfig, convert_to_hybrid, load_hybrid
from lt_train.cache import StreamingLayer
from lt_train.models import TINY_ARCHS, tiny_model
from reference import reference_greedy, reference_logits

S, W = 2, 8
LAZY = [0, 2]  # layer 0 lazy on purpose: transformers reads sequence lengths from layer 0


def _pair(arch, lazy=LAZY, sink=S, window=W, backend="sdpa", base="sdpa"):
    """(hybrid model, reference model) with the same weights; `base`: the attention of the full layers."""
    model = tiny_model(arch, attn_implementation=base)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("lt_test_reference")
    for m in ref.modules():
        if hasattr(m, "q_proj"):
            m.lt_streaming = types.SimpleNamespace(sink=sink, window=window) if m.layer_idx in lazy else None
    convert_to_hybrid(model, HybridConfig(lazy, sink_tokens=sink, window=window, backend=backend))
    return model, ref


def _left_padded(B=3, T=30, pads=(0, 5, 13), vocab=128):
    ids = torch.randint(3, vocab, (B, T))
    am = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(pads):
        am[b, :p] = 0
        ids[b, :p] = 0
    return ids, am


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_no_lazy_layers_is_the_original_model(arch):
    model = tiny_model(arch)
    ids, am = _left_padded()
    before = model(ids, attention_mask=am).logits
    convert_to_hybrid(model, HybridConfig([], sink_tokens=S, window=W))
    after = model(ids, attention_mask=am).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_forward_matches_reference_with_left_padding(arch):
    model, ref = _pair(arch)
    ids, am = _left_padded()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=am, position_ids=pos).logits
    expected = reference_logits(ref, ids, am)
    real = am.bool()
    torch.testing.assert_close(out[real], expected[real], atol=2e-5, rtol=1e-4)
    # without explicit position ids (transformers counts pads as positions) it is still well defined: no NaN
    assert torch.isfinite(model(ids, attention_mask=am).logits).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_full_layers_on_eager_attention_match_reference(arch, monkeypatch):
    """A model loaded with attn_implementation='eager': its full layers keep transformers' eager attention
    (the lazy ones stream); forward with left padding and greedy decoding through the hybrid cache equal the
    reference."""
    model, ref = _pair(arch, base="eager")
    modeling = sys.modules[type(model).__module__]
    eager, calls = modeling.eager_attention_forward, []
    monkeypatch.setattr(modeling, "eager_attention_forward", lambda *a, **k: calls.append(1) or eager(*a, **k))
    ids, am = _left_padded()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    real = am.bool()
    torch.testing.assert_close(model(ids, attention_mask=am, position_ids=pos).logits[real],
                               reference_logits(ref, ids, am)[real], atol=2e-5, rtol=1e-4)
    out = model.generate(ids, attention_mask=am, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out, reference_greedy(ref, ids, am, 12))
    assert len(calls) == 2 * (1 + 12)  # the two full layers, in the forward and in each decoding step


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_full_layers_on_flex_attention_match_reference(arch, monkeypatch):
    """A model loaded with attn_implementation='flex_attention' (forward only: FlexAttention has no backward on
    CPU): its full layers keep transformers' flex attention, the lazy ones stream; left-padded forward equal to
    the reference."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    model, ref = _pair(arch, base="flex_attention")
    flex, calls = ALL_ATTENTION_FUNCTIONS["flex_attention"], []
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "flex_attention",
                        lambda *a, **k: calls.append(1) or flex(*a, **k))
    ids, am = _left_padded()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    real = am.bool()
    with torch.no_grad():
        out = model(ids, attention_mask=am, position_ids=pos).logits
    torch.testing.assert_close(out[real], reference_logits(ref, ids, am)[real], atol=2e-5, rtol=1e-4)
    assert len(calls) == 2  # the two full layers


def test_gradients_match_reference():
    model, ref = _pair("qwen2")
    model.train(), ref.train()
    ids, am = _left_padded()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    keep = (am[:, :-1] * am[:, 1:]).bool()  # predictions made from real tokens only

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep])

    loss(model(ids, attention_mask=am, position_ids=pos).logits).backward()
    loss(ref(ids, attention_mask=am, position_ids=pos, ref_valid=am.bool(), use_cache=False).logits).backward()
    for (name, p), (_, r) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, atol=2e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_generation_is_token_identical_to_recompute(arch):
    model, ref = _pair(arch)
    ids, am = _left_padded(T=30)  # prompt longer than S + W
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=12, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    expected = reference_greedy(ref, ids, am, 12)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_growing_buffer_generation_is_token_identical_to_recompute(arch, monkeypatch):
    """Short prompts, long generation: the lazy layers' buffers grow step by step (3 slots at a time here),
    then the ring wraps; generation must stay identical to full recompute under the streaming mask."""
    monkeypatch.setattr(StreamingLayer, "GROW", 3)
    model, ref = _pair(arch, sink=2, window=12)
    ids, am = _left_padded(T=6, pads=(0, 2, 4))
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=20, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference_greedy(ref, ids, am, 20))
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert cache.layers[LAZY[0]].keys.shape[2] == 2 + 12


def test_a_short_sequence_holds_no_more_in_a_lazy_layer_than_in_a_full_one():
    model, _ = _pair("llama", sink=4, window=1020)
    ids, am = _left_padded(T=40, pads=(0, 0, 0))
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    lazy, full = cache.layers[LAZY[0]], cache.layers[1]
    # generate() sizes both from prompt + new tokens: the lazy layer holds the S sink slots more, not the window
    assert lazy.keys.shape[2] == 4 + 40 + 8 < 4 + 1020
    assert full.keys.shape[2] == 40 + 8 - 1 and full._k.shape[2] == 40 + 8  # allocated once, for every token


def test_full_layer_keeps_every_token_and_copies_rarely():
    """A full layer without a size hint grows in large steps: its keys equal the concatenation of all updates
    (the reference), and 600 one-token steps reallocate a handful of times, not 600."""
    from lt_train.cache import FullLayer

    layer, ks, vs, buffers = FullLayer(), [], [], set()
    for q in [37] + [1] * 600:
        k, v = torch.randn(2, 3, q, 4), torch.randn(2, 3, q, 4)
        ks.append(k)
        vs.append(v)
        out_k, out_v = layer.update(k, v)
        buffers.add(layer._k.data_ptr())
    assert torch.equal(out_k, torch.cat(ks, 2)) and torch.equal(out_v, torch.cat(vs, 2))
    assert len(buffers) <= 4 and layer.get_seq_length() == 637
    layer.batch_select_indices(torch.tensor([1]))
    assert torch.equal(layer.keys, torch.cat(ks, 2)[1:])
    sized = FullLayer(max_cache_len=40)
    sized.update(torch.randn(1, 1, 30, 2), torch.randn(1, 1, 30, 2))
    ptr = sized._k.data_ptr()
    for _ in range(10):
        sized.update(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 1, 2))
    assert sized._k.data_ptr() == ptr and sized._k.shape[2] == 40  # allocated once, written in place


@pytest.mark.parametrize("pads", [(0, 0, 0), (0, 3, 7)])
def test_decode_steps_take_the_fast_path_and_match_recompute(pads, monkeypatch):
    """Once every row's sinks are filled, a decode step attends over the slots as they stand (no position
    metadata, no mask when all are in view): the general positional path must not run at all, and the tokens
    must equal full recompute under the streaming mask, before and after the ring wraps."""
    import lt_train.hybrid as hybrid

    calls = []
    general = hybrid.positional_streaming_sdpa
    monkeypatch.setattr(hybrid, "positional_streaming_sdpa", lambda *a, **k: calls.append(1) or general(*a, **k))
    model, ref = _pair("qwen2", sink=2, window=10)
    ids, am = _left_padded(T=12, pads=pads)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=16, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(out, reference_greedy(ref, ids, am, 16))
    assert calls == []


def test_rows_shorter_than_the_sinks_decode_correctly():
    """A row with fewer real tokens than S fills its sinks while decoding (the general path until they are
    full), then the fast path takes over."""
    model, ref = _pair("llama", sink=4, window=6)
    ids, am = _left_padded(T=6, pads=(0, 3, 5))
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=20, do_sample=False, pad_token_id=0,
                         eos_token_id=None)
    assert torch.equal(out, reference_greedy(ref, ids, am, 20))


def test_generation_uses_constant_size_hybrid_cache():
    model, _ = _pair("llama")
    sizes = []
    for T in (20, 60):
        ids, am = _left_padded(T=T, pads=(0, 3, 7))
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0,
                             eos_token_id=None, return_dict_in_generate=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        assert isinstance(cache, HybridCache)
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, StreamingLayer) == (i in LAZY)
        sizes.append(cache.nbytes())
    assert sizes[0]["lazy"] == sizes[1]["lazy"] > 0  # constant in sequence length
    assert sizes[1]["full"] > sizes[0]["full"]  # full layers grow
    lazy_layer = cache.layers[LAZY[0]]
    assert lazy_layer.keys.shape[2] == S + W and lazy_layer.get_seq_length() == 60 + 4 - 1  # the last token is never fed back


def test_sampled_generation_matches_uncached_sampling():
    model, _ = _pair("mistral")
    ids, am = _left_padded(T=25)
    kw = dict(input_ids=ids, attention_mask=am, max_new_tokens=10, do_sample=True, top_k=20, temperature=1.3,
              pad_token_id=0, eos_token_id=None)
    torch.manual_seed(123)
    cached = model.generate(**kw)
    torch.manual_seed(123)
    uncached = model.generate(use_cache=False, **kw)
    assert torch.equal(cached, uncached)


def test_default_dynamic_cache_also_decodes_correctly():
    """model(..., use_cache=True) without a cache builds transformers' DynamicCache (full history in every
    layer); lazy layers must still apply the streaming mask over it."""
    model, ref = _pair("llama")
    ids, am = _left_padded(T=20)
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=am, position_ids=pos, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert not isinstance(cache, HybridCache)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    am2 = torch.cat([am, torch.ones_like(nxt)], 1)
    step = model(nxt, attention_mask=am2, position_ids=pos[:, -1:] + 1, cache=cache, use_cache=True).logits[:, -1]
    expected = reference_logits(ref, torch.cat([ids, nxt], 1), am2)[:, -1]
    torch.testing.assert_close(step, expected, atol=2e-5, rtol=1e-4)


def test_chunked_prefill_into_hybrid_cache():
    """Two forward calls into one HybridCache (the second a multi-token chunk) equal one recompute."""
    model, ref = _pair("qwen3")
    ids, am = _left_padded(T=40, pads=(0, 4, 9))
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    cache = HybridCache(model.config)
    model(ids[:, :25], attention_mask=am[:, :25], position_ids=pos[:, :25], cache=cache, use_cache=True)
    out = model(ids[:, 25:], attention_mask=am, position_ids=pos[:, 25:], cache=cache, use_cache=True).logits
    expected = reference_logits(ref, ids, am)[:, 25:]
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_save_and_load_hybrid_round_trip(tmp_path):
    model, _ = _pair("qwen2", lazy=[1, 3], sink=3, window=5)
    model.save_pretrained(tmp_path)
    loaded = load_hybrid(str(tmp_path))
    assert loaded.config.lt_hybrid["lazy_layers"] == [1, 3]
    assert [m.lt_streaming is not None for m in loaded.modules() if hasattr(m, "q_proj")] == [False, True, False, True]
    ids, am = _left_padded()
    torch.testing.assert_close(loaded(ids, attention_mask=am).logits, model(ids, attention_mask=am).logits)
    assert list(tmp_path.glob("*.safetensors"))


def test_load_hybrid_refuses_plain_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no hybrid settings"):
        load_hybrid(str(tmp_path))


@pytest.mark.parametrize(
    "cfg,match",
    [
        (HybridConfig([0, 4]), r"out of range .* 4 layers"),
        (HybridConfig([-1]), "out of range"),
        (HybridConfig([1, 1]), "repeated"),
        (HybridConfig([1], sink_tokens=-1), "sink_tokens must be >= 0"),
        (HybridConfig([1], window=0), "window must be >= 1"),
        (HybridConfig([1], backend="xformers"), "unknown backend"),
    ],
)
def test_bad_hybrid_config_errors(cfg, match):
    with pytest.raises(ValueError, match=match):
        convert_to_hybrid(tiny_model("llama"), cfg)


def test_flash_attn_requested_but_missing():
    from lt_train.attention import flash

    if flash.is_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ImportError, match="flash-attn"):
        convert_to_hybrid(tiny_model("llama"), HybridConfig([1], backend="flash_attn"))


def test_unsupported_architecture_names_the_supported_ones():
    from transformers import AutoConfig, AutoModelForCausalLM

    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=2, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama.*qwen2.*qwen3.*mistral"):
        convert_to_hybrid(gpt2, HybridConfig([0]))
