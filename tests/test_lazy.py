"""Lazy ratios against eager attention probabilities summed over the same key set."""
import pytest
import torch

from lt_train.lazy import lazy_ratios, lazy_ratios_per_head
from lt_train.models import TINY_ARCHS, tiny_model


def _eager_reference(model, ids, am, S, W, nq):
    """Per-layer, per-head mass from the full attention matrices of an eager forward."""
    model.set_attn_implementation("eager")
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = model(ids, attention_mask=am, position_ids=pos, output_attentions=True)
    model.set_attn_implementation("sdpa")
    res = []
    for att in out.attentions:  # [B, H, T, T]
        per_row = []
        for b in range(ids.shape[0]):
            real = am[b].nonzero().flatten()
            p = pos[b]
            qs = real[-nq:]
            keys = real
            sel = [(p[keys] < S) | (p[i] - p[keys] < W) for i in qs]
            mass = torch.stack([att[b, :, i, keys][:, s].sum(-1) for i, s in zip(qs, sel)], -1)  # [H, nq]
            per_row.append(mass.mean(-1))
        res.append(torch.stack(per_row).mean(0))
    return torch.stack(res)


def _left_padded_batch():
    ids = torch.randint(3, 128, (3, 50))
    am = torch.ones_like(ids)
    am[1, :7] = 0  # left padding
    am[2, :20] = 0
    return ids, am


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lazy_ratios_match_eager_probabilities(arch):
    model = tiny_model(arch)
    ids, am = _left_padded_batch()
    S, W, nq = 3, 9, 12
    got = lazy_ratios_per_head(model, ids, S, W, nq, attention_mask=am)
    ref = _eager_reference(model, ids, am, S, W, nq)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lazy_ratios(model, ids, S, W, nq, attention_mask=am), ref.mean(-1), atol=1e-5, rtol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # the probe is removed afterwards


def test_lazy_ratios_bf16_close_to_fp32():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (1, 64))
    r32 = lazy_ratios(model, ids, 2, 8, 16)
    r16 = lazy_ratios(model.to(torch.bfloat16), ids, 2, 8, 16)
    torch.testing.assert_close(r16.float(), r32, atol=3e-2, rtol=0)


def test_window_covering_everything_gives_ratio_one():
    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 40))
    torch.testing.assert_close(lazy_ratios(model, ids, 0, 40, 8), torch.ones(4))
    assert (lazy_ratios(model, ids, 0, 1, 8) < 1).all()


# ---------------------------------------------------------------------------------------------------------
# Selection strategies

from lt_train.lazy import (  # noqa: E402
    STRATEGIES,
    pyramid_layers,
    resolve_num_lazy,
    select_lazy_layers,
    select_with_stats,
)


def _samples(n=3, T=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (T,), generator=g) for _ in range(n)]


def test_num_lazy_count_or_fraction():
    assert resolve_num_lazy(0.5, 30) == 15
    assert resolve_num_lazy(15, 30) == 15
    assert resolve_num_lazy(15.0, 30) == 15
    assert resolve_num_lazy(1.0, 30) == 30
    for bad in (31, -1, 0.0, 1.5, True, "half"):
        with pytest.raises(ValueError):
            resolve_num_lazy(bad, 30)


def test_ratio_and_frequency_follow_the_measured_ratios():
    model = tiny_model("llama", num_layers=6)
    samples = _samples()
    sel = select_with_stats(model, samples, 2, "ratio", 2, 6, 8)
    expected = sorted(torch.tensor(sel.per_layer_ratio).topk(2).indices.tolist())
    assert sel.layers == expected
    # the statistic itself is the one lazy_ratios measures per sample
    torch.testing.assert_close(torch.tensor(sel.per_sample_ratio[1]), lazy_ratios(model, samples[1], 2, 6, 8))
    freq = select_with_stats(model, samples, 2, "frequency", 2, 6, 8)
    counts = [0] * 6
    for row in torch.tensor(freq.per_sample_ratio):
        for i in row.topk(2).indices.tolist():
            counts[i] += 1
    assert freq.frequency == counts and sum(counts) == 2 * len(samples)
    assert all(counts[i] >= counts[j] for i in freq.layers for j in set(range(6)) - set(freq.layers))


def test_baselines():
    model = tiny_model("llama", num_layers=8)
    s = _samples(1)
    assert select_lazy_layers(model, s, 3, "first", 2, 6, 8) == [0, 1, 2]
    assert select_lazy_layers(model, s, 3, "last", 2, 6, 8) == [5, 6, 7]
    r1 = select_lazy_layers(model, s, 4, "random", 2, 6, 8, seed=1)
    assert r1 == select_lazy_layers(model, s, 4, "random", 2, 6, 8, seed=1) and len(set(r1)) == 4
    assert r1 != select_lazy_layers(model, s, 4, "random", 2, 6, 8, seed=2) or r1 != select_lazy_layers(
        model, s, 4, "random", 2, 6, 8, seed=3)


@pytest.mark.parametrize("L,n", [(30, 15), (8, 3), (4, 4), (5, 1)])
def test_pyramid_is_denser_with_depth(L, n):
    layers = pyramid_layers(L, n)
    assert len(set(layers)) == n and all(0 <= i < L for i in layers)
    assert sum(i >= L / 2 for i in layers) >= sum(i < L / 2 for i in layers)


def test_nll_strategy_ranks_layers_by_measured_damage():
    from lt_train import HybridConfig, convert_to_hybrid
    from lt_train.nll import mean_nll

    model = tiny_model("qwen2", num_layers=5)
    samples = _samples(2, T=40)
    sel = select_with_stats(model, samples, 2, "default", 2, 6, 8)
    assert sel.strategy == "nll" and len(sel.delta_nll) == 5
    assert sel.layers == sorted(sorted(range(5), key=lambda i: sel.delta_nll[i])[:2])
    assert model.config._attn_implementation == "sdpa" and not hasattr(model.config, "lt_hybrid")
    # the recorded delta is what converting that layer alone really does
    base = mean_nll(model, samples)
    convert_to_hybrid(model, HybridConfig([3], 2, 6))
    assert abs(mean_nll(model, samples) - base - sel.delta_nll[3]) < 1e-5


def _output_error_reference(model, ids, am, S, W, nq):
    """Per-layer relative output error from real forwards: each layer's o_proj output on the last nq real queries
    with full attention vs with that layer alone converted to streaming (the layers before it are unchanged, so
    it sees the same input), ||y_stream - y_full|| / ||y_full|| per query, averaged over queries and rows."""
    from lt_train import HybridConfig, convert_to_hybrid, revert_hybrid

    pos = (am.cumsum(-1) - 1).clamp(min=0)
    mods = [m for m in model.modules() if hasattr(m, "o_proj")]
    L = len(mods)

    def o_proj_outputs(layer):
        got = {}
        h = mods[layer].o_proj.register_forward_hook(lambda m, i, o: got.setdefault("y", o.detach()))
        with torch.no_grad():
            model(ids, attention_mask=am, position_ids=pos)
        h.remove()
        return got["y"]  # [B, T, hidden]

    full = [o_proj_outputs(i) for i in range(L)]
    errs = []
    for i in range(L):
        convert_to_hybrid(model, HybridConfig([i], S, W))
        y = o_proj_outputs(i)
        revert_hybrid(model)
        per_row = []
        for b in range(ids.shape[0]):
            qs = am[b].nonzero().flatten()[-nq:]
            d = (y[b, qs] - full[i][b, qs]).norm(dim=-1) / full[i][b, qs].norm(dim=-1)
            per_row.append(d.mean())
        errs.append(torch.stack(per_row).mean())
    return torch.stack(errs)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_output_error_matches_real_streaming_forwards(arch):
    from lt_train.lazy import layer_statistics

    model = tiny_model(arch)
    ids, am = _left_padded_batch()
    S, W, nq = 3, 9, 12
    _, err = layer_statistics(model, ids, S, W, nq, attention_mask=am, output_error=True)
    ref = _output_error_reference(model, ids, am, S, W, nq)
    torch.testing.assert_close(err, ref, atol=1e-5, rtol=1e-4)
    assert (ref > 0.01).all()  # the window matters here: a statistic of zeros would not pass


def test_error_strategy_picks_the_layers_with_the_smallest_output_error():
    model = tiny_model("qwen3", num_layers=5)
    sel = select_with_stats(model, _samples(2, T=40), 2, "error", 2, 6, 8)
    assert len(sel.output_error) == 5 and sel.strategy == "error"
    assert sel.layers == sorted(sorted(range(5), key=lambda i: sel.output_error[i])[:2])


def test_selection_input_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="no samples"):
        select_lazy_layers(model, [], 2)
    with pytest.raises(ValueError, match="unknown selection strategy"):
        select_lazy_layers(model, _samples(1), 2, "shapley")
    with pytest.raises(ValueError, match="out of range"):
        select_lazy_layers(model, _samples(1), 5, "first")
    with pytest.raises(ValueError, match="1-D"):
        select_lazy_layers(model, [torch.zeros(2, 3, dtype=torch.long)], 2)


def test_short_samples_warn_with_count():
    model = tiny_model("llama")
    samples = _samples(2, T=48) + _samples(1, T=10)
    with pytest.warns(UserWarning, match=r"1 of 3 samples have T <= sink \+ recent \+ last_queries = 16"):
        select_lazy_layers(model, samples, 2, "ratio", 2, 6, 8)


def test_every_strategy_returns_sorted_distinct_layers():
    model = tiny_model("mistral", num_layers=6)
    for strategy in STRATEGIES:
        layers = select_lazy_layers(model, _samples(1, T=40), 0.5, strategy, 2, 6, 8)
        assert layers == sorted(set(layers)) and len(layers) == 3


def test_chunked_token_nll_equals_model_loss():
    from lt_train.nll import token_nll

    model = tiny_model("qwen3")
    ids = torch.randint(3, 128, (1, 37))
    total, count = token_nll(model, ids[0], chunk=8)
    assert count == 36
    torch.testing.assert_close(torch.tensor(total / count), model(ids, labels=ids).loss, atol=1e-5, rtol=1e-5)
