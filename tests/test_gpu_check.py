"""benchmarks/gpu_check.py: the prepared GPU check runs its whole CPU path (--device cpu --tiny), its comparisons
can fail, and its time budget skips instead of overrunning. On a GPU it is run by hand (benchmarks/gpu_check.sh)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_check  # noqa: E402

from lt_train.cache import require_transformers  # noqa: E402


def test_tiny_cpu_run_passes_every_section(tmp_path):
    # a budget no busy machine exhausts: this checks code paths, not timing, and must not skip a section
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--device", "cpu",
                          "--tiny", "--out", str(tmp_path), "--budget-s", "1800"],
                         capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    recs = data["records"]
    assert not [r for r in recs if r["status"] == "fail"]
    by = {s: [r for r in recs if r["section"] == s] for s in gpu_check.SECTIONS}
    # every backend that runs on CPU was compared with the reference, backward included for sdpa
    att = [r for r in by["attention"] if r["status"] == "pass"]
    assert {(r["backend"], r["layout"]) for r in att} >= {(b, k) for b in ("sdpa", "flex")
                                                           for k in ("rows", "packed", "padded")}
    assert all(r["out_rel_err"] < 1e-5 for r in att)
    assert all(r["grad_rel_err"] < 1e-5 for r in att if r["backend"] == "sdpa")
    # hybrid forward/backward and greedy generation on all four architectures, and the evaluator's loop
    passed = {r["name"] for r in by["hybrid"] if r["status"] == "pass"}
    for arch in ("llama", "qwen2", "qwen3", "mistral"):
        assert f"{arch} forward+backward (sdpa streaming) vs reference" in passed
        assert f"{arch} greedy generate (hybrid cache) == recompute" in passed
    assert "evaluator decode loop (llama), eager and compiled, == recompute" in passed
    # decode: three variants measured, the hybrid holds fewer KV bytes once the prompt exceeds S + W
    summary = next(r for r in by["decode"] if r["name"].startswith("summary"))
    v = summary["variants"]
    assert set(v) == {"full_static", "full_dynamic", "hybrid", "full_static_compiled", "hybrid_compiled"}
    assert all(x["tokens_per_s"] > 0 and x["ops_per_step"] > 0 for x in v.values())
    # the compiled steps decode the eager steps' tokens (fp32 on CPU: checked, not only reported)
    same = [r for r in by["decode"] if "compiled vs eager" in r["name"]]
    assert len(same) == 2 and all(r["status"] == "pass" and r["same_tokens"] for r in same)
    assert v["hybrid"]["kv_bytes"] < v["full_static"]["kv_bytes"]
    assert v["full_static"]["kv_bytes"] >= v["full_dynamic"]["kv_bytes"]  # preallocated: at least the tokens held
    assert summary["bytes_bound_vs_static"] > 1
    assert any(r["status"] == "pass" and "first-step logits" in r["name"] for r in by["decode"])
    # training: LoRA and full, full vs hybrid, with finite losses
    train = [r for r in by["train"] if r["status"] == "pass"]
    assert {(r["mode"], r["variant"]) for r in train} == {(m, v) for m in ("lora", "full")
                                                         for v in ("full", "hybrid_sdpa")}
    assert all(r["loss"] > 0 for r in train)
    assert "== training step" in out.stdout and "== decode" in out.stdout


@pytest.mark.parametrize("kind", ["rows", "packed", "padded"])
def test_attention_comparison_fails_when_the_window_is_wrong(kind):
    dev = torch.device("cpu")
    good = gpu_check.attention_case(kind, 2, 300, 4, 48, torch.float32, "sdpa", dev, heads=(4, 2), head_dim=16)
    bad = gpu_check.attention_case(kind, 2, 300, 4, 48, torch.float32, "sdpa", dev, heads=(4, 2), head_dim=16,
                                   ref_window=49)
    assert good["ok"] and not bad["ok"]


def test_reference_separates_documents_and_sinks():
    """The reference itself, on a case small enough to write out: 2 documents [3, 4], S=1, W=2."""
    q = torch.zeros(1, 1, 7, 2)  # equal scores: the output is the mean of the visible values
    v = torch.arange(7.0)[None, None, :, None].expand(1, 1, 7, 2)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    out = gpu_check.dense_reference(q, torch.zeros(1, 1, 7, 2), v, 1, 2, pos)[0, 0, :, 0]
    # visible keys per query: {0} {0,1} {0,1,2}->sink 0 + window {1,2} ; doc 2: {3} {3,4} {3,4,5} {3,5,6}
    expected = torch.tensor([0, 0.5, 1, 3, 3.5, 4, 14 / 3])
    torch.testing.assert_close(out, expected)


def test_time_budget_skips_instead_of_running(tmp_path):
    rc = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--only", "hybrid", "--budget-s", "0"])
    recs = json.loads((tmp_path / "gpu_check.json").read_text())["records"]
    assert rc == 0 and recs and all(r["status"] == "skip" for r in recs)


def test_unknown_section_is_refused():
    with pytest.raises(SystemExit):
        gpu_check.main(["--device", "cpu", "--tiny", "--only", "decode,nonsense"])


def test_old_transformers_is_refused_with_the_reason():
    with pytest.raises(ImportError, match="transformers >= 5.24.*Cache.update"):
        require_transformers("5.17.0")
    require_transformers("5.24.0")
    require_transformers("5.30.1.dev0")
