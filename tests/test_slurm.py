"""The slurm/ scripts on a real two-node SLURM cluster (Debian's slurm-wlm: one slurmctld, slurmd
n1 at 127.0.0.2 and n2 at 127.0.0.3, started by launch/slurm_local.sh in a private folder).

Needs root (to install slurm-wlm and munge) or SLURM already installed; skipped otherwise."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from shard_fixtures import pack_csv, write_csv_dataset
from slurm_cluster import slurm_unavailable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO / "launch" / "slurm_local.sh"
NODE_ADDRS = {"127.0.0.2", "127.0.0.3"}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive free ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            for p in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
    raise RuntimeError("no block of free ports")


@dataclass
class Cluster:
    env: dict
    dir: Path

    def submit(self, script: str, *args: str, sbatch: tuple[str, ...] = (), out: Path) -> str:
        cmd = ["sbatch", "--parsable", f"--output={out}", *sbatch, str(REPO / script), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))

    def wait(self, job_id: str, states=ENDED, timeout: float = 600) -> dict[str, str]:
        deadline = time.time() + timeout
        while (info := self.job(job_id))["JobState"] not in states:
            assert time.time() < deadline, f"job {job_id} still {info['JobState']} after {timeout} s"
            time.sleep(1)
        return info

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout


def ray_processes(job_id: str) -> list[str]:
    """The job's Ray processes (started from its temp dir), and Ray workers whose raylet is gone."""
    marker = f"/tmp/ray-{job_id}/"
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        raylet = (p.info["environ"] or {}).get("RAY_RAYLET_PID")
        if marker in cmdline or (cmdline.startswith("ray::") and raylet and not psutil.pid_exists(int(raylet))):
            found.append(cmdline[:200])
    return found


def assert_no_ray_left(job_id: str, grace: float = 15) -> None:
    deadline = time.time() + grace  # a worker notices its raylet's end within seconds
    while (left := ray_processes(job_id)) and time.time() < deadline:
        time.sleep(0.5)
    assert left == [], left


def daemons(folder: Path) -> list[str]:
    return [" ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] in ("slurmctld", "slurmd", "munged", "slurmstepd")
            and (p.info["name"] != "munged" or str(folder) in " ".join(p.info["cmdline"] or []))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    folder = Path(tempfile.mkdtemp(prefix="lsl-", dir="/tmp"))  # short: slurmd's socket paths live there
    env = {**os.environ, "LIQE_SLURM_DIR": str(folder), "LIQE_SLURM_PORT": str(free_port_block(3)),
           "LIQE_SLURM_STATE": str(tmp_path_factory.mktemp("slurm-state")),
           "LIQE_VENV": str(Path(sys.executable).parent.parent)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set by local clusters of other tests in this process
    before = set(daemons(folder))
    up = subprocess.run(["bash", str(SLURM_LOCAL), "up"], env=env, capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield Cluster(env, folder)
    finally:
        down = subprocess.run(["bash", str(SLURM_LOCAL), "down"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert down.returncode == 0, down.stderr
        assert set(daemons(folder)) <= before, "SLURM daemons outlived launch/slurm_local.sh down"
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-data")
    return pack_csv(write_csv_dataset(root / "a", n_refs=10, per_ref=2, size=(224, 232)), root / "shards", "a",
                    shard_max_count=5)


def train_overrides(shards: Path, out: Path, **keys) -> list[str]:
    values = {"datasets": [{"name": "a", "shards": str(shards), "batch_size": 2}], "model.name": "liqe-tiny",
              "crops.eval_crops": 1, "epochs": 1, "steps_per_epoch": 3, "checkpoint_every": 3,
              "eval_parts": ["test"], "shuffle_buffer": 4, "out_dir": str(out), **keys}
    return [a for k, v in values.items() for a in ("--set", f"{k}={json.dumps(v)}")]


TWO_NODES = ("--nodes=2", "--cpus-per-task=2", "--gpus-per-node=0", "--time=20")


def test_training_job_on_two_nodes(cluster, shards, tmp_path):
    """`sbatch -N 2 slurm/train.sbatch launch/configs/demo.yaml --set ...`: one rank on each node's
    address, the model saved, the job COMPLETED, and no Ray process left."""
    out = tmp_path / "runs"
    log = tmp_path / "train.out"
    job = cluster.submit("slurm/train.sbatch", "launch/configs/demo.yaml",
                         *train_overrides(shards, out, name="slurm", placement="STRICT_SPREAD"), sbatch=TWO_NODES,
                         out=log)
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED", log.read_text()
    run = out / "slurm"
    assert {json.loads((run / "ranks" / f"rank-{r}.json").read_text())["node_ip"] for r in (0, 1)} == NODE_ADDRS
    assert (run / "final.safetensors").stat().st_size > 0 and (run / "best.json").exists()
    assert "2 node(s) (127.0.0.2, 127.0.0.3)" in log.read_text()
    assert_no_ray_left(job)
    assert not (Path(cluster.env["LIQE_SLURM_STATE"]) / job / "token").exists()  # the token went with the job


def test_scoring_job_on_two_nodes(cluster, tmp_path):
    """`sbatch -N 2 slurm/score.sbatch SHARDS --model ... --out ...`: one worker per CPU on both
    nodes, every image scored once."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from liqe_dist.data.corpus import CorpusConfig, pack_corpus
    from liqe_dist.models.liqe.config import LIQEConfig
    from liqe_dist.models.registry import build_model
    from liqe_dist.models.weights import save_weights

    rng = np.random.default_rng(0)
    (tmp_path / "photos").mkdir()
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"{i}.png")
    corpus = pack_corpus(tmp_path / "photos", tmp_path / "shards" / "photos", "photos",
                         CorpusConfig(shard_max_count=2, workers=1), progress=False)
    save_weights(build_model(LIQEConfig(name="liqe-tiny")), tmp_path / "tiny.safetensors")
    log = tmp_path / "score.out"
    job = cluster.submit("slurm/score.sbatch", str(corpus.out_dir), "--model", f"tiny={tmp_path / 'tiny.safetensors'}",
                         "--out", str(tmp_path / "scores"), "--eval-crops", "1", "--no-progress",
                         sbatch=TWO_NODES, out=log)
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert {node for node in NODE_ADDRS if f"on {node}" in text} == NODE_ADDRS  # workers on both nodes
    keys = [k for p in (tmp_path / "scores").glob("*.parquet") for k in pq.read_table(p).column("key").to_pylist()]
    assert len(keys) == 16 and len(set(keys)) == 16
    assert json.loads((tmp_path / "scores" / "manifest.json").read_text())["complete"]
    assert_no_ray_left(job)


def test_bad_config_fails_the_job_fast_without_starting_ray(cluster, tmp_path):
    log = tmp_path / "bad.out"
    started = time.time()
    job = cluster.submit("slurm/train.sbatch", str(tmp_path / "missing.yaml"), sbatch=TWO_NODES, out=log)
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert time.time() - started < 60
    text = log.read_text()
    assert "missing.yaml: cannot read config" in text and "Ray head" not in text
    assert_no_ray_left(job)


def test_pack_array_packs_two_datasets_in_parallel(cluster, tmp_path):
    table = tmp_path / "datasets.txt"
    lines = ["# format root options"]
    for name, refs in (("first", 6), ("second", 4)):
        csv_path = write_csv_dataset(tmp_path / name, n_refs=refs, per_ref=2, size=(64, 64))
        lines.append(f"csv {csv_path} --name {name}")
    table.write_text("\n".join(lines) + "\n\n")
    out = tmp_path / "shards"
    job = cluster.submit("slurm/pack.sbatch", str(table), "--out", str(out),
                         sbatch=("--array=0-1", "--cpus-per-task=1"), out=tmp_path / "pack-%a.out")
    tasks = [cluster.wait(f"{job}_{k}", timeout=300) for k in (0, 1)]
    assert [t["JobState"] for t in tasks] == ["COMPLETED"] * 2, [(tmp_path / f"pack-{k}.out").read_text()
                                                                   for k in (0, 1)]
    for name, images in (("first", 12), ("second", 8)):
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert manifest["samples"] == images, manifest
    # both tasks ran at once (two nodes, one CPU each needed): each started before the other ended
    assert tasks[0]["StartTime"] <= tasks[1]["EndTime"] and tasks[1]["StartTime"] <= tasks[0]["EndTime"]


def test_requeued_search_resumes_and_runs_every_trial_once(cluster, shards, tmp_path):
    """A single-node Tune job (2 trials, one at a time) is `scontrol requeue`d while its second
    trial trains: SLURM terminates every process, the job runs again and resumes the search: the
    finished trial is not rerun, the other continues from its checkpoint, every step of each
    appears once."""
    storage = tmp_path / "runs"
    train = {"name": "t", "datasets": [{"name": "a", "shards": str(shards), "batch_size": 2}],
             "model": {"family": "liqe", "name": "liqe-tiny"}, "optim": {"lr": 1.0e-4, "zero_stage": 1},
             "crops": {"train_crops": 1, "eval_crops": 1}, "epochs": 2, "steps_per_epoch": 3,
             "checkpoint_every": 2, "workers": 2, "cpus_per_worker": 0.5, "shuffle_buffer": 4,
             "eval_parts": ["test"]}  # a trial's 2 workers and its driver on one 2-CPU node
    search = tmp_path / "search.yaml"
    search.write_text(yaml.safe_dump({"train": train, "name": "requeued", "storage": str(storage),
                                      "metric": "loss", "mode": "min",
                                      "search_space": {"optim.lr": {"grid": [1e-3, 3e-4]}}}))
    exp = storage / "requeued"
    log = tmp_path / "tune.out"
    job = cluster.submit("slurm/tune.sbatch", str(search), sbatch=("--nodes=1", *TWO_NODES[1:]), out=log)
    deadline = time.time() + 500
    while not (exp / "trial_00001" / "checkpoints" / "step-00000002" / "rank-1.pt").exists():
        assert cluster.job(job)["JobState"] in ("RUNNING", "PENDING"), log.read_text()
        assert time.time() < deadline, f"the second trial never checkpointed\n{log.read_text()}"
        time.sleep(0.5)
    cluster.run("scontrol", "requeue", job)
    requeued(cluster, job)
    info = cluster.wait(job, timeout=600)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert "1 node(s)" in text and "restart 1] Ray head" in text and "resuming" in text
    events = {t: [json.loads(x)["event"] for x in (exp / t / "events.jsonl").read_text().splitlines()]
              for t in ("trial_00000", "trial_00001")}
    assert events == {"trial_00000": ["start", "finish"], "trial_00001": ["start", "resume", "finish"]}, events
    for trial in events:
        with open(exp / trial / "steps.csv", newline="") as f:
            assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 7)), trial
    assert_no_ray_left(job)


def requeued(cluster: Cluster, job: str, restarts: int = 1) -> None:
    """Wait for the requeued job to be pending again, then let it start without SLURM's 2-minute
    requeue delay."""
    info = cluster.wait(job, states={"PENDING"}, timeout=180)
    assert info["Restarts"] == str(restarts), info
    cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")


def test_time_limit_signal_stops_the_command_and_requeues(cluster, tmp_path):
    """USR1 to the batch script, as `#SBATCH --signal=B:USR1@300` sends it before the time limit:
    run_requeueable interrupts the command (SIGINT reaches a liqe-dist started in the background
    of a script), the job requeues itself, and the rerun finishes the work."""
    out = tmp_path / "synthetic"
    script = tmp_path / "job.sbatch"
    script.write_text("#!/usr/bin/env bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\nset -euo pipefail\n"
                      'source "$SLURM_SUBMIT_DIR/slurm/common.sh"\n'
                      f"run_requeueable liqe-dist make-synthetic {out} --references 3 --no-progress\n")
    log = tmp_path / "job.out"
    job = cluster.submit(str(script), sbatch=("--cpus-per-task=1",), out=log)
    deadline = time.time() + 120
    while not any(out.rglob("*.*")):  # the command is writing: past start-up
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("RUNNING", "PENDING"), log.read_text()
        time.sleep(0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    requeued(cluster, job)
    info = cluster.wait(job, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert text.index("time limit near") < text.index("ERROR liqe_dist: interrupted") < text.index("requeueing")
    assert (out / "labels.csv").exists()


def test_gpus_from_slurm_become_ray_gpus(cluster, tmp_path):
    """`--gpus-per-node=2` on two nodes (the local cluster's stand-in GPUs): the job's Ray cluster
    has 2 GPUs and the allocated CPUs on each node, where Ray Train then puts one worker per GPU."""
    out = tmp_path / "nodes.json"
    script = tmp_path / "resources.sbatch"
    script.write_text("#!/usr/bin/env bash\nset -euo pipefail\n"
                      'source "$SLURM_SUBMIT_DIR/slurm/common.sh"\nsource "$LIQE_REPO/slurm/ray_cluster.sh"\n'
                      f'"$liqe_python" -c "import json, os, ray; ray.init(address=os.environ[\'LIQE_RAY_ADDRESS\']); '
                      f"json.dump({{n['NodeManagerAddress']: n['Resources'] for n in ray.nodes() if n['Alive']}}, "
                      f"open('{out}', 'w'))\"\n")
    log = tmp_path / "resources.out"
    job = cluster.submit(str(script), sbatch=("--nodes=2", "--cpus-per-task=2", "--gpus-per-node=2"), out=log)
    info = cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", log.read_text()
    nodes = json.loads(out.read_text())
    assert {ip: (r.get("GPU"), r.get("CPU")) for ip, r in nodes.items()} == {ip: (2.0, 2.0) for ip in NODE_ADDRS}
    assert_no_ray_left(job)
