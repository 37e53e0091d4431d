"""LightTransfer on a real model and a real benchmark: Qwen2.5-Coder-0.5B-Instruct (a Qwen2, like QwQ-32B) on GSM8K,
full vs hybrid, training-free and after LightTransfer-Train (SFT) or self-distillation.

    python benchmarks/gsm8k_table.py [--out outputs/gsm8k_table --problems 64 --rows full,free_nll,sft,...]

Protocol: the first --problems GSM8K test problems (../shared/data/gsm8k_test.jsonl), the evaluator's zero-shot
chat prompt asking for \\boxed{}, greedy, up to --max-new tokens, graded by the project's grader. Half the layers
lazy, S=4, W=64: a prompt is ~113 tokens and an answer ~290, so after its first 64 answer tokens a lazy layer no
longer sees the question (W well under prompt + answer, without a few-shot prompt that would triple the prefill).
Fine-tunes: LoRA on the long chain-of-thought samples of ../shared/data/long_cot_sft.jsonl (real R1-Distill
traces; the last --heldout rows are kept out for the NLL and KL columns), --steps steps of one --pack-token row.

Rows (in the order they are worth their CPU time; --rows picks): `full` the full model; `free_nll`,
`free_error`, `free_ratio` training-free hybrids with the layers each selection criterion picks (on long-CoT
samples); `online` LightTransfer-Test (layers chosen during each prefill); `sft`, `distill` the hybrid after
LightTransfer-Train with the SFT or the distillation objective; `sft_s0`, `distill_s0` the same at S=0 (the
natively exportable form); `full_sft` the full model after the same SFT (the control for "SFT changed the
model"). Columns: accuracy ± SE, paired difference to the full model ± paired SE, mean output tokens, peak KV
bytes, tokens/s, held-out NLL and KL(original || row) on real long-CoT text. With `sft_s0`, that hybrid is also
exported natively and answered in plain transformers, and its answers are compared with the evaluator's
(--no-native skips it).

Every stage runs the project's entry points and leaves its output under --out: a rerun skips what is done, so
the table can be built in parts (one row per command, say).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stages import layers_arg, run_stage, write_table  # noqa: E402

MODEL = "qwen2.5-coder-0.5b"
LAYERS = 24
DATA = os.path.join(ROOT, "..", "shared", "data")
ROWS = ("full", "free_nll", "sft", "distill", "sft_s0", "distill_s0", "full_sft", "free_error", "free_ratio",
        "online")
TRAINED = {  # row: (objective, hybrid?, S=0?)
    "sft": ("sft", True, False), "distill": ("distill", True, False), "sft_s0": ("sft", True, True),
    "distill_s0": ("distill", True, True), "full_sft": ("sft", False, False)}
LABELS = {
    "full": "full model", "free_nll": "hybrid, training-free, `nll` layers",
    "free_error": "hybrid, training-free, `error` layers", "free_ratio": "hybrid, training-free, `ratio` layers",
    "online": "hybrid, online selection (LightTransfer-Test)", "sft": "hybrid after LightTransfer-Train (SFT)",
    "distill": "hybrid after self-distillation", "sft_s0": "hybrid after SFT, S=0",
    "distill_s0": "hybrid after self-distillation, S=0", "full_sft": "full model after the same SFT (control)"}


def _cot(args) -> list[str]:
    return ["data=long_cot_local", f"data.path={args.data}/long_cot_sft.jsonl", f"data.max_length={args.pack}"]


def select(args, strategy: str) -> list[int]:
    d = os.path.join(args.out, f"select_{strategy}")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "lazy_layers.json")
    run_stage("select_lazy.py", [f"model={MODEL}", *_cot(args), f"output_dir={d}", f"lazy.strategy={strategy}",
                                 f"lazy.num_lazy={args.fraction}", f"lazy.sink_tokens={args.sink}",
                                 f"lazy.window={args.window}", f"lazy.max_samples={args.select_samples}",
                                 f"lazy.nll_samples={args.nll_samples}", "logging.wandb=false"],
              path, os.path.join(d, "log.txt"))
    with open(path) as f:
        return json.load(f)["lazy_layers"]


def train(args, row: str, layers: list[int]) -> str:
    objective, hybrid, s0 = TRAINED[row]
    d = os.path.join(args.out, f"train_{row}")
    os.makedirs(d, exist_ok=True)
    lazy = [f"lazy.layers={layers_arg(layers)}", f"lazy.sink_tokens={0 if s0 else args.sink}",
            f"lazy.window={args.window}"] if hybrid else ["lazy.layers=[]"]
    run_stage("train.py", [f"model={MODEL}", *_cot(args), "train=lora", f"train.objective={objective}",
                           f"output_dir={d}", *lazy, f"data.max_samples={args.train_samples}",
                           f"train.max_steps={args.steps}", "train.grad_accum=1", f"train.pack_length={args.pack}",
                           f"train.lr={args.lr}", "train.save_every=1000", "validation.enabled=false",
                           "logging.wandb=false"],
              os.path.join(d, "model", "config.json"), os.path.join(d, "log.txt"))
    return os.path.join(d, "model")


def evaluate(args, row: str, model: str, hybrid: list[str]) -> str:
    d = os.path.join(args.out, f"eval_{row}_p{args.problems}")
    os.makedirs(d, exist_ok=True)
    done = glob.glob(os.path.join(d, "*", "summary.json"))
    run_stage("eval.py", [f"model={model}", "eval=custom", f"eval.path={args.data}/gsm8k_test.jsonl",
                          "eval.mode=gsm8k", "eval.greedy=true", f"eval.max_new_tokens={args.max_new}",
                          f"eval.max_problems={args.problems}", f"eval.batch_size={args.batch}",
                          f"output_dir={d}", "logging.wandb=false", *hybrid],
              done[0] if done else os.path.join(d, "-"), os.path.join(d, "log.txt"))
    return os.path.dirname(glob.glob(os.path.join(d, "*", "summary.json"))[0])


def native_check(args, model_dir: str, run_dir: str) -> str:
    """The trained S=0 hybrid exported natively (launch/export.py) and answered in plain transformers
    (benchmarks/plain_generate.py: a process that never imports lt_train; left-padded batches of --batch in the
    evaluator's order): its answers beside the evaluator's on the same prompts. Returns the table's line."""
    import subprocess

    from hydra import compose, initialize_config_dir

    from lt_train.eval.benchmarks import load_problems
    from lt_train.eval.grader import answer_key, extract_answer, grade
    from lt_train.eval.sampling import build_prompt
    from lt_train.models import load_tokenizer

    d = os.path.join(args.out, f"native_sft_s0_p{args.problems}")
    os.makedirs(d, exist_ok=True)
    exported = os.path.join(d, "model")
    run_stage("export.py", [f"model={model_dir}", f"output_dir={exported}"], os.path.join(exported, "config.json"),
              os.path.join(d, "export_log.txt"))
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):  # as the eval stage's
        ecfg = compose("evaluate", overrides=["eval=custom", f"eval.path={args.data}/gsm8k_test.jsonl",
                                              "eval.mode=gsm8k", f"eval.max_problems={args.problems}"]).eval
    problems = load_problems(ecfg)
    tok = load_tokenizer(exported)
    prompts = [build_prompt(tok, p.question, ecfg.instruction, ecfg.system_prompt) for p in problems]
    texts_path = os.path.join(d, f"texts_new{args.max_new}_b{args.batch}.json")
    if not os.path.exists(texts_path):
        with open(os.path.join(d, "prompts.json"), "w") as f:
            json.dump(prompts, f)
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "plain_generate.py"), exported,
               os.path.join(d, "prompts.json"), texts_path + ".part", f"--max-new={args.max_new}",
               f"--batch={args.batch}"]
        print(f"  $ {' '.join(cmd[1:])}", flush=True)
        with open(os.path.join(d, "plain_log.txt"), "w") as log:
            if subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=d) != 0:
                sys.exit(f"plain_generate.py failed; its output: {d}/plain_log.txt")
        os.replace(texts_path + ".part", texts_path)
    with open(texts_path) as f:
        theirs = json.load(f)
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        ours = {r["problem"]: r for r in map(json.loads, f)}

    def key(text):  # the grader's normalised answer: "18" and "18.00" are the same answer
        return answer_key(extract_answer(text, "gsm8k"), "gsm8k")

    same_answer = sum(key(t) == key(ours[p.id]["output"]) for p, t in zip(problems, theirs))
    same_text = sum(t == ours[p.id]["output"] for p, t in zip(problems, theirs))
    right = sum(grade(t, p.answer, "gsm8k") for p, t in zip(problems, theirs))
    n = len(problems)
    return (f"The S=0 SFT hybrid exported natively (`launch/export.py`) and run in plain transformers "
            f"(`benchmarks/plain_generate.py`, no lt_train import, batches of {args.batch}): the evaluator's final "
            f"answer on {same_answer}/{n} problems, its exact text on {same_text}/{n}; accuracy {100 * right / n:.1f}% "
            f"({right}/{n}).")


def correct_by_problem(run_dir: str) -> dict[str, float]:
    with open(os.path.join(run_dir, "samples.jsonl")) as f:
        return {r["problem"]: float(r["correct"]) for r in map(json.loads, f)}


def heldout_texts(args, tok) -> list:
    """The last --heldout long-CoT samples (never trained on: the fine-tunes read the first --train-samples),
    cut to --cot-length tokens."""
    with open(os.path.join(args.data, "long_cot_sft.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    if args.train_samples + args.heldout > len(rows):
        sys.exit(f"--train-samples {args.train_samples} + --heldout {args.heldout} exceed the {len(rows)} rows")
    texts = [tok(r["problem"] + "\n\n" + r["response"], return_tensors="pt").input_ids[0][: args.cot_length]
             for r in rows[-args.heldout:]]
    return texts


def nll_and_kl(model_path: str, hybrid, teacher, texts) -> tuple[float, float]:
    """Mean token NLL of the texts, and mean KL(original || model) per token, the head applied per chunk."""
    import torch

    from lt_train import convert_to_hybrid
    from lt_train.distill import DistillSettings, kl_sum
    from lt_train.models import load_model
    from lt_train.nll import decoder_of, mean_nll

    model = load_model(model_path).eval()
    if hybrid is not None:
        convert_to_hybrid(model, hybrid)
    nll = mean_nll(model, texts)
    kl = tokens = 0.0
    with torch.no_grad():
        for ids in texts:
            hs = decoder_of(model)(input_ids=ids[None]).last_hidden_state[0]
            ht = decoder_of(teacher)(input_ids=ids[None]).last_hidden_state[0]
            for a in range(0, len(ids) - 1, 256):
                b = min(a + 256, len(ids) - 1)
                kl += kl_sum(model.get_output_embeddings()(hs[a:b]), teacher.get_output_embeddings()(ht[a:b]),
                             torch.ones(b - a), DistillSettings()).item()
            tokens += len(ids) - 1
    return nll, kl / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "gsm8k_table"))
    ap.add_argument("--data", default=DATA, help="the shared benchmark folder (gsm8k_test.jsonl, long_cot_sft.jsonl)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"rows to build, from {ROWS}")
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--max-new", type=int, default=512, help="answers end within ~350 tokens")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--select-samples", type=int, default=4)
    ap.add_argument("--nll-samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps of each fine-tune (one packed row each)")
    ap.add_argument("--pack", type=int, default=1024, help="tokens per training row (longer samples are cut)")
    ap.add_argument("--train-samples", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--heldout", type=int, default=4)
    ap.add_argument("--cot-length", type=int, default=1024)
    ap.add_argument("--no-native", action="store_true",
                    help="skip exporting the S=0 SFT hybrid and answering in plain transformers (with the sft_s0 row)")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    unknown = set(rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown --rows {sorted(unknown)}; choose from {ROWS}")
    for f in ("gsm8k_test.jsonl", "long_cot_sft.jsonl"):
        if not os.path.exists(os.path.join(args.data, f)):
            sys.exit(f"{args.data}/{f} not found: pass --data the shared benchmark folder")
    args.data = os.path.abspath(args.data)
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    from lt_train import HybridConfig
    from lt_train.eval.metrics import paired_difference
    from lt_train.models import load_model, load_tokenizer

    n_lazy = round(args.fraction * LAYERS)
    layers = {}
    if any(r not in ("full", "online") for r in rows):
        layers["nll"] = select(args, "nll")
    for s in ("error", "ratio"):
        if f"free_{s}" in rows:
            layers[s] = select(args, s)
    specs = {}  # row: (model path, hybrid overrides for eval.py, HybridConfig for the NLL/KL columns)
    for r in rows:
        if r == "full":
            specs[r] = (MODEL, [], None)
        elif r.startswith("free_"):
            lz = layers[r[5:]]
            specs[r] = (MODEL, [f"hybrid.lazy_layers={layers_arg(lz)}", f"hybrid.sink_tokens={args.sink}",
                                f"hybrid.window={args.window}"], HybridConfig(lz, args.sink, args.window))
        elif r == "online":
            specs[r] = (MODEL, [f"hybrid.online_num_lazy={n_lazy}", f"hybrid.sink_tokens={args.sink}",
                                f"hybrid.window={args.window}"], None)
        else:
            specs[r] = (train(args, r, layers["nll"]), [], None)  # saved hybrid (or full): loads as trained
    runs = {r: evaluate(args, r, model, hyb) for r, (model, hyb, _) in specs.items()}

    tok = load_tokenizer(MODEL)
    texts = heldout_texts(args, tok)
    teacher = None
    table = []
    full = correct_by_problem(runs["full"]) if "full" in runs else None
    for r in rows:
        with open(os.path.join(runs[r], "summary.json")) as f:
            m = json.load(f)["metrics"]
        cached = os.path.join(runs[r], f"cot_{len(texts)}x{args.cot_length}.json")
        if not os.path.exists(cached) and specs[r][0] is not None and r != "online":
            if teacher is None:
                teacher = load_model(MODEL).eval()
            nll, kl = nll_and_kl(specs[r][0], specs[r][2], teacher, texts)
            with open(cached, "w") as f:
                json.dump({"nll": nll, "kl": kl}, f)
        cot = json.load(open(cached)) if os.path.exists(cached) else {"nll": None, "kl": None}
        diff = None
        if full is not None and r != "full":
            mine = correct_by_problem(runs[r])
            ids = sorted(full)
            diff = paired_difference([mine[i] for i in ids], [full[i] for i in ids])
        table.append((r, m, diff, cot))

    fmt = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
    lines = [f"{MODEL} on the first {args.problems} GSM8K test problems (greedy, up to {args.max_new} new tokens, "
             f"batch {args.batch}); hybrids: {n_lazy}/{LAYERS} layers lazy, S={args.sink} (S=0 where named), "
             f"W={args.window}; fine-tunes: LoRA, {args.steps} steps x {args.pack} tokens of long-CoT text, "
             f"lr {args.lr}; NLL and KL: {len(texts)} held-out long-CoT texts x {args.cot_length} tokens", "",
             "| row | accuracy | vs full (paired) | mean output tokens | peak KV MiB | tokens/s | long-CoT NLL | "
             "KL to original |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r, m, diff, cot in table:
        vs = "—" if diff is None else f"{100 * diff[0]:+.1f} ± {100 * diff[1]:.1f}"
        lines.append(f"| {LABELS[r]} | {100 * m['pass@1']:.1f}% ± {100 * m['pass@1_se']:.1f} | {vs} | "
                     f"{m['mean_output_tokens']:.0f} | {m['peak_kv_bytes'] / 2**20:.1f} | {m['tokens_per_s']:.1f} | "
                     f"{fmt(cot['nll'], '.4f')} | {fmt(cot['kl'], '.4f')} |")
    if "sft_s0" in rows and not args.no_native:
        lines += ["", native_check(args, specs["sft_s0"][0], runs["sft_s0"])]
    write_table(args.out, lines, t_start)


if __name__ == "__main__":
    main()
