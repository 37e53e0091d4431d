"""Running launch/train.py as a real command (single process or torchrun) on the tiny model."""
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the demo data and step count of the tests (the default job runs another task; see conf/train.yaml)
TINY = ["model=tiny", "data=demo", "train.max_steps=12", "validation.task=demo", "validation.streaming_control=false",
        "lazy.strategy=default",
        "data.num_samples=24", "data.max_length=1500", "train.pack_length=1600", "train.grad_accum=1",
        "lazy.window=64", "lazy.layers=[1,3]", "validation.heldout=2", "validation.accuracy_problems=0"]


def torchrun(nproc: int) -> list[str]:
    """`torchrun --nproc_per_node=N` on a port the system has just handed out as free (a fixed or hashed port can
    meet another run's or service's)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port",
            str(free_port())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


FAULTS = os.path.join(ROOT, "tests", "fixtures", "faults")


def fault_env(faults: dict | None) -> dict:
    """The environment that injects `faults` (tests/fixtures/faults/sitecustomize.py) into launch/train.py."""
    if not faults:
        return {}
    path = os.pathsep.join(p for p in (FAULTS, os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, "LT_TEST_FAULTS": json.dumps(faults)}


def run_two_nodes(out_dir, overrides, caches, timeout=600, faults=None):
    """launch/train.py as two torchrun "nodes" of one process each on this machine, meeting through a c10d
    rendezvous (as `launch/multinode.sbatch` starts them), node i with its own cache_dir `caches[i]`. Returns
    the two CompletedProcess-like (returncode, stdout, stderr) of the nodes."""
    port = free_port()
    script = os.path.join(ROOT, "launch", "train.py")
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **fault_env(faults))
    procs = []
    for node, cache in enumerate(caches):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=lt-two-nodes", script] + TINY + list(overrides) + [
               f"output_dir={out_dir}", f"cache_dir={cache}"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                      env=e))
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def run_train(out_dir, overrides=(), nproc=1, timeout=900, env=None, faults=None):
    script = os.path.join(ROOT, "launch", "train.py")
    if nproc > 1:
        cmd = torchrun(nproc) + [script]
    else:
        cmd = [sys.executable, script]
    cmd += TINY + list(overrides) + [f"output_dir={out_dir}", f"cache_dir={os.path.join(str(out_dir), 'cache')}"]
    e = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env or {}), **fault_env(faults))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)


def losses(out_dir) -> dict[int, float]:
    """step -> loss; a resumed run appends, so later lines win."""
    out = {}
    with open(os.path.join(out_dir, "train_log.jsonl"), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]
    return out


def learns_and_resumes_exactly(tmp_path, args, nproc=1):
    """Run `args` for 6 steps in tmp_path/a (the loss falls, training lowers the held-out NLL), then again in
    tmp_path/b stopped abruptly after step 5 and resumed: steps 5 and 6 repeat run a's losses."""
    import pytest

    a = run_train(tmp_path / "a", args, nproc=nproc)
    assert a.returncode == 0, a.stdout[-3000:] + a.stderr[-3000:]
    la = losses(tmp_path / "a")
    assert la[6] < la[1]
    with open(os.path.join(tmp_path, "a", "summary.json"), encoding="utf-8") as f:
        results = json.load(f)["results"]
    assert results["hybrid, after"]["heldout_nll"] < results["hybrid, before"]["heldout_nll"]
    killed = run_train(tmp_path / "b", list(args) + ["validation.enabled=false"], nproc=nproc,
                       faults={"exit_after_step": 5})
    assert killed.returncode != 0
    resumed = run_train(tmp_path / "b", list(args) + ["validation.enabled=false"], nproc=nproc)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    lb = losses(tmp_path / "b")
    for step in (5, 6):
        assert lb[step] == pytest.approx(la[step], rel=1e-5, abs=1e-6)
