"""The `launch/select_lazy.py` job, through Hydra's compose API and once as a real command."""
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from lt_train.select_job import run
from train_helpers import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONF = os.path.join(ROOT, "conf")
TINY = ["model=tiny", "data=demo", "data.num_samples=3", "data.max_length=1500", "lazy.window=32",
        "lazy.last_queries=8", "lazy.nll_samples=2"]


def _cfg(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("select_lazy", overrides=overrides)


@pytest.mark.parametrize("strategy", ["default", "frequency"])
def test_selection_job_writes_json_and_chart(tmp_path, strategy):
    res = run(_cfg(TINY + [f"lazy.strategy={strategy}", f"output_dir={tmp_path}"]))
    data = json.loads((tmp_path / "lazy_layers.json").read_text())
    assert data["lazy_layers"] == res["lazy_layers"] and len(data["lazy_layers"]) == 2
    assert len(data["per_layer_ratio"]) == 4 and len(data["per_head_ratio"][0]) == 4
    assert len(data["per_sample"]) == 3 and data["data"]["used"] == 3 and data["model"]["name"] == "tiny"
    # the settings a later run reads back (load_hybrid / hybrid.from_file take S and W from here)
    assert (data["sink_tokens"], data["window"], data["last_queries"]) == (4, 32, 8)
    assert data["strategy"] == ("nll" if strategy == "default" else strategy)
    assert "revision" in data["model"] and data["model"]["model_type"] == "llama" and data["num_layers"] == 4
    assert (tmp_path / "lazy_ratios.png").read_bytes()[:4] == b"\x89PNG"


def test_selection_job_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        run(_cfg(TINY + ["lazy.num_lazy=9", f"output_dir={tmp_path}"]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(_cfg(["model=smollm2-135m", "model.name=/nonexistent/model", f"output_dir={tmp_path}"]))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no examples left"):
        run(_cfg(TINY[:1] + ["data=jsonl", f"data.path={empty}", f"output_dir={tmp_path}"]))


def test_short_samples_are_reported(tmp_path):
    with pytest.warns(UserWarning, match="3 of 3 samples have T <="):
        res = run(_cfg(TINY + ["lazy.window=2000", "lazy.strategy=ratio", f"output_dir={tmp_path}"]))
    assert res["short_samples"] == 3


def test_command_line_entry_point(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "launch", "select_lazy.py"), *TINY, "lazy.strategy=ratio",
           f"output_dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "lazy_layers.json").read_text())["strategy"] == "ratio"


def test_wandb_offline_run_records_the_selection(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run(_cfg(TINY + ["lazy.strategy=ratio", "logging.wandb=true", f"output_dir={tmp_path}"]))
    from wandb_reader import logged_keys, run_file

    history, _ = logged_keys(run_file(str(tmp_path)))  # read back what the run file holds
    assert {"lazy_layers", "lazy_ratio_chart/path"} | {f"lazy_ratio/layer_{i}" for i in range(4)} <= history


def test_prepare_command_line(tmp_path):
    cmd = [sys.executable, os.path.join(ROOT, "data_prep", "prepare.py"), "model=tiny", "data=demo",
           "data.num_samples=4", f"cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "examples: 4" in proc.stdout
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["examples"] == 4 and (tmp_path / "out" / "lengths.png").exists()


def test_selection_shared_over_two_processes_chooses_what_one_process_chooses(tmp_path):
    """nll scores each layer on one rank only and ratios each sample on one rank only; the sums over ranks give
    every rank the same statistics, the same layers and the same file as a single process."""
    import re

    script = os.path.join(ROOT, "launch", "select_lazy.py")
    args = TINY + ["lazy.strategy=nll"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, script, *args, f"output_dir={tmp_path}/one"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(torchrun(2) + [script, *args, f"output_dir={tmp_path}/two"], capture_output=True,
                         text=True, cwd=ROOT, timeout=600, env=env)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    a = json.loads((tmp_path / "one" / "lazy_layers.json").read_text())
    b = json.loads((tmp_path / "two" / "lazy_layers.json").read_text())
    ranks = dict(re.findall(r"rank (\d): lazy layers \(nll\): (\[[\d, ]*\])", two.stdout))
    assert set(ranks) == {"0", "1"} and len(set(ranks.values())) == 1
    assert json.loads(ranks["1"]) == a["lazy_layers"] == b["lazy_layers"] and b["processes"] == 2
    assert b["delta_nll"] == pytest.approx(a["delta_nll"], abs=1e-6)
    assert b["per_layer_ratio"] == pytest.approx(a["per_layer_ratio"], abs=1e-6)
