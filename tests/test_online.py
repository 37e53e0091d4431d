"""LightTransfer-Test: lazy layers chosen during prefill with a priority queue over layers."""
import copy
import heapq
import types

import pytest
import torch

from lt_train import HybridConfig, OnlineHybridCache, convert_to_hybrid
from lt_train.cache import StreamingLayer
from lt_train.lazy import layer_statistics, lazy_ratios
from lt_train.models import tiny_model
from reference import reference_greedy

S, W, LQ, L, N_LAZY = 2, 6, 8, 6, 3


def _prompt():
    ids = torch.randint(3, 128, (3, 36))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    am[2, :11] = 0
    return ids.masked_fill(am == 0, 0), am


def _simulate_queue(ratios, num_full):
    queue, lazy, alive = [], [], 0
    for i, r in enumerate(ratios.tolist()):
        heapq.heappush(queue, (-r, i))
        alive = max(alive, len(queue))
        while len(queue) > num_full:
            lazy.append(heapq.heappop(queue)[1])
    return sorted(lazy), alive


@pytest.mark.parametrize("arch,criterion", [("llama", "ratio"), ("qwen2", "ratio"), ("qwen3", "error"),
                                           ("mistral", "error")])
def test_online_selection_generates_and_matches_reference(arch, criterion):
    """The queue, fed the offline statistic of each layer (the lazy ratio, or minus the output error), picks the
    same layers as the cache during a real prefill; decoding then matches the reference."""
    model = tiny_model(arch, num_layers=L)
    ref = copy.deepcopy(model)
    ids, am = _prompt()
    if criterion == "ratio":
        laziness = lazy_ratios(model, ids, S, W, LQ, attention_mask=am)
    else:
        laziness = -layer_statistics(model, ids, S, W, LQ, attention_mask=am, output_error=True)[1]
    expected_lazy, expected_alive = _simulate_queue(laziness, L - N_LAZY)

    convert_to_hybrid(model, HybridConfig([], S, W, online_num_lazy=N_LAZY, last_queries=LQ,
                                          online_criterion=criterion))
    # Count, as each layer starts its prefill, the caches that really hold the whole prompt (not the cache's own
    # counter): compressing only at the end of the prefill would make this L.
    holding = []

    def count_full(module, args, kwargs):
        cache = kwargs.get("cache")
        if cache is not None and args[0].shape[1] == ids.shape[1]:  # prefill only
            holding.append(sum(not isinstance(lay, StreamingLayer) and lay.get_seq_length() >= ids.shape[1]
                               for lay in cache.layers))
    for layer in model.model.layers:
        layer.register_forward_pre_hook(count_full, with_kwargs=True)
    out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0,
                         eos_token_id=None, return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    assert isinstance(cache, OnlineHybridCache)
    assert cache.lazy_layers == expected_lazy
    seen = cache.errors if criterion == "error" else cache.ratios  # the statistic the queue ranked by
    assert not (cache.ratios if criterion == "error" else cache.errors)
    sign = -1 if criterion == "error" else 1
    torch.testing.assert_close(torch.tensor([sign * seen[i] for i in range(L)]), laziness.float(), atol=1e-5,
                               rtol=1e-4)
    assert cache.max_full_alive == expected_alive <= (L - N_LAZY) + 1
    assert len(holding) == L and max(holding) + 1 == expected_alive  # +1: the layer about to run
    for i, layer in enumerate(cache.layers):
        assert isinstance(layer, StreamingLayer) == (i in expected_lazy)
        if i in expected_lazy:
            assert layer.keys.shape[2] == S + W
    assert cache.peak_nbytes > cache.nbytes()["total"]

    # reference: full attention over the prompt everywhere, streaming for generated tokens in the chosen layers
    ref.set_attn_implementation("lt_test_reference")
    for m in ref.modules():
        if hasattr(m, "q_proj"):
            m.lt_streaming = types.SimpleNamespace(sink=S, window=W) if m.layer_idx in expected_lazy else None
    expected = reference_greedy(ref, ids, am, 8, ref_stream_from=ids.shape[1])
    assert torch.equal(out.sequences, expected)


def test_online_config_errors():
    with pytest.raises(ValueError, match="unknown online_criterion 'mass'"):
        convert_to_hybrid(tiny_model("llama"), HybridConfig([], online_num_lazy=2, online_criterion="mass"))
    with pytest.raises(ValueError, match="not both"):
        convert_to_hybrid(tiny_model("llama"), HybridConfig([1], online_num_lazy=2))
    with pytest.raises(ValueError, match="out of range"):
        convert_to_hybrid(tiny_model("llama"), HybridConfig([], online_num_lazy=9))


def test_online_ranks_by_output_error_by_default_and_old_checkpoints_keep_ratio(tmp_path):
    """`error` is the default (benchmarks/selection_quality.py: it halves the NLL cost of ratio online); a hybrid
    saved before the criterion was a setting ranked by ratio and loads that way, a new one keeps its criterion."""
    from lt_train import load_hybrid

    model = convert_to_hybrid(tiny_model("llama"), HybridConfig([], online_num_lazy=2))
    assert HybridConfig.from_model_config(model.config).online_criterion == "error"
    model.save_pretrained(tmp_path / "new")
    assert HybridConfig.from_model_config(load_hybrid(str(tmp_path / "new")).config).online_criterion == "error"
    del model.config.lt_hybrid["online_criterion"]
    model.save_pretrained(tmp_path / "old")
    assert HybridConfig.from_model_config(load_hybrid(str(tmp_path / "old")).config).online_criterion == "ratio"
