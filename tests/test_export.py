"""Native export of a sink-free hybrid (Qwen2 / Qwen3): a plain checkpoint that transformers runs alone, in a
process that never imports lt_train, with the hybrid's logits and tokens."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lt_train import HybridConfig, convert_to_hybrid
from lt_train.export import export_native
from lt_train.models import tiny_model, tiny_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY, W = [0, 2], 6

PLAIN = r"""
import sys, torch
from transformers import AutoModelForCausalLM
path, ids_file, out_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(path).eval()
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
assert not any(m.startswith("lt_train") for m in sys.modules), "lt_train was imported"
torch.save({"logits": logits, "gen": gen, "types": model.config.layer_types}, out_file)
"""


def _run_plain(path, ids, tmp_path):
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(path), str(tmp_path / "ids.pt"), str(tmp_path / "o.pt")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "o.pt")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_exported_sink_free_hybrid_runs_in_plain_transformers_with_the_same_logits_and_tokens(arch, tmp_path):
    model = convert_to_hybrid(tiny_model(arch), HybridConfig(LAZY, sink_tokens=0, window=W))
    export_native(model, str(tmp_path / "native"))
    ids = torch.randint(3, 128, (2, 20))  # longer than W: the window matters
    out = _run_plain(tmp_path / "native", ids, tmp_path)
    assert out["types"] == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    with torch.no_grad():
        hybrid_logits = model(ids).logits
        full_logits = tiny_model(arch)(ids).logits
    torch.testing.assert_close(out["logits"], hybrid_logits, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(out["logits"], full_logits, atol=1e-3)  # the export is not the full model
    gen = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(out["gen"], gen)
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert "lt_hybrid" not in cfg and cfg["sliding_window"] == W and cfg["use_sliding_window"] is True


@pytest.mark.parametrize("arch,settings,match", [
    ("qwen2", dict(sink_tokens=4, window=W), "sink_tokens=4: transformers' sliding-window layers"),
    ("llama", dict(sink_tokens=0, window=W), "'llama': its transformers config has no per-layer sliding window"),
    ("mistral", dict(sink_tokens=0, window=W), "no per-layer sliding window"),
])
def test_export_refuses_what_has_no_native_equivalent(arch, settings, match, tmp_path):
    model = convert_to_hybrid(tiny_model(arch), HybridConfig(LAZY, **settings))
    with pytest.raises(ValueError, match=match):
        export_native(model, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="not a hybrid model"):
        export_native(tiny_model("qwen2"), str(tmp_path / "y"))


def test_export_command_line(tmp_path):
    ckpt = tmp_path / "hybrid"
    model = convert_to_hybrid(tiny_model("qwen3"), HybridConfig(LAZY, sink_tokens=0, window=W))
    model.save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"), f"model={ckpt}",
                           f"output_dir={tmp_path / 'native'}"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 sliding-window layers [0, 2]" in proc.stdout
    cfg = json.loads((tmp_path / "native" / "config.json").read_text())
    assert cfg["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert (tmp_path / "native" / "tokenizer_config.json").exists() and not (tmp_path / "native" / "hydra").exists()
    ids = torch.randint(3, 128, (1, 16))
    out = _run_plain(tmp_path / "native", ids, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(ids).logits, atol=2e-5, rtol=1e-4)


PLAIN_GENERATE = os.path.join(ROOT, "benchmarks", "plain_generate.py")  # imports no lt_train; says so if it did


@pytest.mark.slow
def test_exported_qwen2_hybrid_answers_gsm8k_in_plain_transformers_as_the_evaluator_does(tmp_path):
    """The real Qwen2.5-Coder-0.5B made a sink-free hybrid (half the layers sliding, W=64: a lazy layer loses the
    question while it answers) and exported natively: plain transformers, in a process that never imports
    lt_train, writes the same greedy answers as lt_train's evaluator (one prompt at a time, no padding)."""
    from conftest import SHARED_DATA

    from lt_train.eval.grader import extract_answer
    from lt_train.eval.sampling import GenSettings, build_prompt, generate_batch
    from lt_train.models import load_model, load_tokenizer

    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    questions = ["A shop sells pens at 3 dollars each. Tom buys 14 pens. How many dollars does he pay?"]
    path = os.path.join(SHARED_DATA, "gsm8k_test.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            questions += [json.loads(next(f))["problem"] for _ in range(2)]
    model, tok = load_model("qwen2.5-coder-0.5b"), load_tokenizer("qwen2.5-coder-0.5b")
    convert_to_hybrid(model, HybridConfig(list(range(1, 24, 2)), sink_tokens=0, window=64))
    export_native(model, str(tmp_path / "native"), tok)
    prompts = [build_prompt(tok, q, instruction) for q in questions]
    max_new = 360
    gs = GenSettings(1, True, 0.0, 1.0, 0, max_new, 1, 0, instruction, None)
    ours = [generate_batch(model, tok, [p], gs, [0]).texts[0] for p in prompts]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    proc = subprocess.run([sys.executable, PLAIN_GENERATE, str(tmp_path / "native"), str(tmp_path / "prompts.json"),
                           str(tmp_path / "out.json"), f"--max-new={max_new}", "--batch=1"],
                          capture_output=True, text=True, timeout=1200, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    assert [extract_answer(t, "gsm8k") for t in theirs] == [extract_answer(t, "gsm8k") for t in ours]
    assert theirs == ours
