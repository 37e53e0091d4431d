"""Evaluation reports: summary.json, a Markdown report with a per-problem table, and a pass@k chart."""
from __future__ import annotations

import os

from ..io import atomic_write_json, atomic_write_text, pyplot, save_figure
from .metrics import ks_for, paired_difference

MiB = 2**20


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in r) + " |")
    return "\n".join(lines)


def _cell(text, limit: int = 40) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def summary_rows(s: dict) -> list[list]:
    n = s["n_samples"]
    rows = [[f"avg@{n} = pass@1 (mean over samples ± SE over problems)",
             f"{_pct(s['pass@1'])} ± {_pct(s['pass@1_se'])}"],
            [f"cons@{n} = maj@{n} (the majority answer)", _pct(s[f"maj@{n}"])]]
    rows += [[f"pass@{k} (unbiased)", _pct(s[f"pass@{k}"])] for k in ks_for(n)[1:]]
    rows += [["mean output tokens", f"{s['mean_output_tokens']:.0f}"],
             ["cut at max_new_tokens", f"{s['truncated']} / {s['samples']}"],
             ["no extractable answer", f"{s['no_answer']} / {s['samples']}"],
             ["grader timeouts (counted wrong)", s["grader_timeouts"]],
             ["grader worker crashes, twice on one check (counted wrong)", s.get("grader_crashes", 0)],
             ["batches split after running out of memory", s.get("oom_splits", 0)],
             ["generation tokens/s", f"{s['tokens_per_s']:.1f}"],
             [f"peak KV cache (batch {s['batch_size']})", f"{s['peak_kv_bytes'] / MiB:.1f} MiB"]]
    return rows


def write_run_report(out_dir: str, meta: dict, summary: dict, per_problem: list[dict], samples: list[dict]) -> None:
    """summary.json + report.md + lengths.png for one model."""
    atomic_write_json(os.path.join(out_dir, "summary.json"), {**meta, "metrics": summary, "problems": per_problem})
    plot_lengths(os.path.join(out_dir, "lengths.png"), meta, samples)
    n = summary["n_samples"]
    md = [f"# {meta['benchmark']}: {meta['label']}", "",
          f"{summary['problems']} problems x {n} samples. Model: `{meta['model']}` ({meta['attention']}). "
          f"Generation: {meta['protocol']}.", "",
          _table(["metric", "value"], summary_rows(summary)), "",
          "Output lengths of correct and wrong samples: `lengths.png`.", "", "## Per problem", "",
          _table(["id", "reference", "correct", "pass@1", f"maj@{n} answer", "maj ok", "mean tokens", "cut"],
                 [[p["id"], _cell(p["reference"]), f"{p['correct']}/{p['n']}", _pct(p["pass@1"]),
                   _cell(p["maj_answer"]), "yes" if p["maj_correct"] else "no", f"{p['mean_tokens']:.0f}",
                   p["truncated"]] for p in per_problem]), ""]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(md))


def comparison(a: dict, b: dict) -> dict:
    """Side by side numbers of two runs over the same problems and seeds (a relative to b)."""
    pa = [p["pass@1"] for p in a["problems"]]
    pb = [p["pass@1"] for p in b["problems"]]
    if [p["id"] for p in a["problems"]] != [p["id"] for p in b["problems"]]:
        raise ValueError("the two runs did not score the same problems")
    diff, se = paired_difference(pa, pb)
    ma, mb = a["metrics"], b["metrics"]
    n = ma["n_samples"]
    return {"model": a["label"], "compare_with": b["label"],
            "pass@1_diff": diff, "pass@1_diff_se": se,
            f"maj@{n}_diff": ma[f"maj@{n}"] - mb[f"maj@{n}"],
            "throughput_ratio": ma["tokens_per_s"] / mb["tokens_per_s"],
            "kv_memory_ratio": ma["peak_kv_bytes"] / mb["peak_kv_bytes"] if mb["peak_kv_bytes"] else float("nan"),
            "mean_output_tokens_ratio": ma["mean_output_tokens"] / mb["mean_output_tokens"]}


def write_comparison(out_dir: str, a: dict, b: dict) -> dict:
    """comparison.json + comparison.md + passk.png for two runs (`summary.json` contents)."""
    c = comparison(a, b)
    ma, mb = a["metrics"], b["metrics"]
    n = ma["n_samples"]
    rows = [["pass@1", f"{_pct(ma['pass@1'])} ± {_pct(ma['pass@1_se'])}",
             f"{_pct(mb['pass@1'])} ± {_pct(mb['pass@1_se'])}",
             f"{100 * c['pass@1_diff']:+.1f} ± {100 * c['pass@1_diff_se']:.1f} points (paired SE)"],
            [f"maj@{n}", _pct(ma[f"maj@{n}"]), _pct(mb[f"maj@{n}"]), f"{100 * c[f'maj@{n}_diff']:+.1f} points"]]
    rows += [[f"pass@{k}", _pct(ma[f"pass@{k}"]), _pct(mb[f"pass@{k}"]),
              f"{100 * (ma[f'pass@{k}'] - mb[f'pass@{k}']):+.1f} points"] for k in ks_for(n)[1:]]
    rows += [["generation tokens/s", f"{ma['tokens_per_s']:.1f}", f"{mb['tokens_per_s']:.1f}",
              f"{c['throughput_ratio']:.2f}x"],
             [f"peak KV cache (batch {ma['batch_size']})", f"{ma['peak_kv_bytes'] / MiB:.1f} MiB",
              f"{mb['peak_kv_bytes'] / MiB:.1f} MiB", f"{c['kv_memory_ratio']:.3f}x"],
             ["mean output tokens", f"{ma['mean_output_tokens']:.0f}", f"{mb['mean_output_tokens']:.0f}",
              f"{c['mean_output_tokens_ratio']:.2f}x"],
             ["cut at max_new_tokens", ma["truncated"], mb["truncated"], ""]]
    per = [[pa["id"], _cell(pa["reference"]), f"{pa['correct']}/{pa['n']}", f"{pb['correct']}/{pb['n']}",
            f"{pa['correct'] - pb['correct']:+d}"] for pa, pb in zip(a["problems"], b["problems"])]
    md = [f"# {a['benchmark']}: `{a['label']}` vs `{b['label']}`", "",
          f"Same {ma['problems']} problems, {n} samples each, same seeds. A = `{a['label']}` ({a['attention']}); "
          f"B = `{b['label']}` ({b['attention']}). Generation: {a['protocol']}.", "",
          "Throughput is generated tokens per second of `generate` wall time; it also depends on how long each "
          "model's answers are (the mean output tokens row).", "",
          _table(["", "A", "B", "A vs B"], rows), "", "## Per problem (correct samples)", "",
          _table(["id", "reference", "A", "B", "A - B"], per), ""]
    atomic_write_json(os.path.join(out_dir, "comparison.json"), c)
    atomic_write_text(os.path.join(out_dir, "comparison.md"), "\n".join(md))
    plot_pass_at_k(os.path.join(out_dir, "passk.png"), [a, b])
    return c


def plot_pass_at_k(path: str, runs: list[dict]) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in runs:
        m = r["metrics"]
        ks = ks_for(m["n_samples"])
        ax.plot(ks, [100 * m[f"pass@{k}"] for k in ks], marker="o", label=r['label'])
        ax.scatter([m["n_samples"]], [100 * m[f"maj@{m['n_samples']}"]], marker="x", s=60)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples)")
    ax.set_ylabel("pass@k, % (x: maj@n)")
    ax.set_title(runs[0]["benchmark"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def plot_lengths(path: str, meta: dict, samples: list[dict]) -> None:
    """Histogram of output tokens, correct vs wrong samples: long-reasoning failures often sit at the cap."""
    plt = pyplot()
    cap = meta["generation"]["max_new_tokens"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    groups = [[r["tokens"] for r in samples if r["correct"]], [r["tokens"] for r in samples if not r["correct"]]]
    ax.hist(groups, bins=30, range=(0, cap), stacked=True, color=["tab:green", "tab:red"],
            label=[f"correct ({len(groups[0])})", f"wrong ({len(groups[1])})"])
    ax.axvline(cap, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel(f"output tokens (cap {cap})")
    ax.set_ylabel("samples")
    ax.set_title(f"{meta['benchmark']}: {meta['label']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
