"""The slurm/ scripts on a real two-node SLURM cluster (Debian's slurm-wlm: one slurmctld, slurmd
n1 at 127.0.0.2 and n2 at 127.0.0.3, started by launch/slurm_local.sh in a private folder).

Needs root (to install slurm-wlm and munge) or SLURM already installed; skipped otherwise."""

from __future__ import annotations

import csv
import glob
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
        job = proc.stdout.strip().split(";")[0]
        SUBMITTED[job] = time.time() - 1  # job ids restart with each test cluster: older runs' dirs are not its
        return job

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
    marker = f"/tmp/ray-{job_id}-"  # the job's temp dirs: /tmp/ray-JOBID-XXXXXX (mktemp, one per node)
    found = []
    for p in psutil.process_iter(["cmdline", "environ"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        raylet = (p.info["environ"] or {}).get("RAY_RAYLET_PID")
        if marker in cmdline or (cmdline.startswith("ray::") and raylet and not psutil.pid_exists(int(raylet))):
            found.append(cmdline[:200])
    return found


SUBMITTED: dict[str, float] = {}  # job id -> when it was submitted


def job_temp_dirs(job_id: str) -> list[str]:
    """The job's Ray temp dirs (made since it was submitted) still on the nodes."""
    return [d for d in glob.glob(f"/tmp/ray-{job_id}-*") if os.path.getctime(d) >= SUBMITTED.get(job_id, 0)]


def assert_no_ray_left(job_id: str, grace: float = 45) -> None:
    """No Ray process of the job runs any more, and no temp dir of it is left on the nodes."""
    # a worker notices its raylet's end within seconds; on a loaded 2-core machine Ray's
    # dashboard agent has taken over 15 s to exit (a leak stays caught: it never exits)
    deadline = time.time() + grace
    while (left := ray_processes(job_id)) and time.time() < deadline:
        time.sleep(0.5)
    assert left == [], left
    while (dirs := job_temp_dirs(job_id)) and time.time() < deadline:
        time.sleep(0.5)
    assert dirs == [], dirs


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
    step2 = exp / "trial_00001" / "checkpoints" / "step-00000002"
    while not all((step2 / f).exists() for f in ("model.safetensors", "rank-0.pt", "rank-1.pt")):  # complete
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
    # slurmd revokes the old run's credential in whole seconds: a restart within the same second
    # gets "Job credential revoked" and the job fails (seen here in 1 of 3 runs)
    time.sleep(1.5)
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
    while not any(out.rglob("*.png")):  # the command is writing images: past start-up
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


CLUSTER_ONLY = ("#!/usr/bin/env bash\nset -euo pipefail\n"
                'source "$SLURM_SUBMIT_DIR/slurm/common.sh"\nsource "$LIQE_REPO/slurm/ray_cluster.sh"\n')


def test_bad_scoring_arguments_fail_the_job_fast_without_starting_ray(cluster, tmp_path):
    """slurm/score.sbatch runs `score-shards --check` with the job's arguments before Ray: a
    missing weight file fails the job in seconds, exit code 2, the file named."""
    (tmp_path / "shards").mkdir()
    log = tmp_path / "score.out"
    started = time.time()
    job = cluster.submit("slurm/score.sbatch", str(tmp_path / "shards"), "--model", f"m={tmp_path / 'none.safetensors'}",
                         "--out", str(tmp_path / "scores"), sbatch=TWO_NODES, out=log)
    info = cluster.wait(job, timeout=120)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
    assert time.time() - started < 60
    text = log.read_text()
    assert f"{tmp_path / 'none.safetensors'}: no such file" in text and "Ray head" not in text, text
    assert_no_ray_left(job)


def test_a_prepared_ray_temp_dir_is_not_used(cluster, tmp_path):
    """/tmp/ray-JOBID, made before the job starts (here a link to another user's folder), is not
    where the job's Ray goes: each node's Ray goes into a fresh mode-0700 folder from mktemp."""
    script = tmp_path / "cluster.sbatch"
    script.write_text(CLUSTER_ONLY)
    log = tmp_path / "cluster.out"
    job = cluster.submit(str(script), sbatch=("--hold", "--export=ALL,LIQE_RAY_KEEP_TEMP=1", *TWO_NODES), out=log)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    planted = Path(f"/tmp/ray-{job}")
    planted.unlink(missing_ok=True)
    planted.symlink_to(theirs)
    try:
        cluster.run("scontrol", "release", job)
        info = cluster.wait(job, timeout=240)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED", text
        assert list(theirs.iterdir()) == []  # nothing of the job's went through the planted link
        worker_log = (Path(cluster.env["LIQE_SLURM_STATE"]) / job / "ray-n2.log").read_text()
        used = [Path(re.search(r"Ray's files in (\S+)", text)[1]),
                Path(re.search(r"Ray temp dir on n2: (\S+)", worker_log)[1])]
        for path in used:  # /tmp/ray-JOBID-XXXXXX/r: Ray's own folder (it makes it 0777) in one of the job's
            st = path.parent.lstat()
            assert path.parent.name.startswith(f"ray-{job}-") and path.parent.parent == Path("/tmp"), path
            assert not path.parent.is_symlink() and oct(st.st_mode & 0o777) == oct(0o700) and st.st_uid == os.getuid()
            assert any(path.glob("session_*")), path  # Ray's session went there
        assert used[0] != used[1]
    finally:
        planted.unlink()
        for kept in job_temp_dirs(job):  # kept for this look (LIQE_RAY_KEEP_TEMP): ours to remove
            shutil.rmtree(kept)
    assert_no_ray_left(job)


def test_jobs_220_ids_apart_share_a_node(cluster, tmp_path):
    """Job ids 220 apart got the same head ports (10000 + (id % 220) * 100), so the second of two
    such jobs on one node failed; now both run at once, each with its own ports. (Held filler
    jobs take the ids in between; SLURM gives ids in order.)"""
    flags = ("--nodes=1", "-w", "n1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10", "--hold")
    filler = tmp_path / "filler.sbatch"
    filler.write_text("#!/usr/bin/env bash\ntrue\n")

    def submit(job_script: Path) -> str:
        return cluster.submit(str(job_script), sbatch=flags, out=tmp_path / "%j.out")

    def script() -> Path:
        # each job waits (at most 120 s) until both have their Ray cluster, so the two overlap
        path = tmp_path / "job.sbatch"
        path.write_text(CLUSTER_ONLY + f'echo "$LIQE_RAY_ADDRESS" > {tmp_path}/addr-$SLURM_JOB_ID\n'
                        f'for _ in $(seq 120); do [[ $(ls {tmp_path}/addr-* | wc -l) == 2 ]] && break; sleep 1; done\n')
        return path

    ids = [submit(script())]
    fillers = []
    while int(fillers[-1] if fillers else ids[0]) < int(ids[0]) + 219:
        fillers.append(submit(filler))
    ids.append(submit(script()))
    cluster.run("scancel", *fillers)
    if int(ids[1]) != int(ids[0]) + 220:
        cluster.run("scancel", *ids)
        pytest.skip(f"SLURM gave ids {ids[0]} and {ids[1]}, not 220 apart")
    cluster.run("scontrol", "release", ",".join(ids))
    infos = [cluster.wait(j, timeout=300) for j in ids]
    assert [i["JobState"] for i in infos] == ["COMPLETED"] * 2, [(tmp_path / f"{j}.out").read_text() for j in ids]
    assert {i["NodeList"] for i in infos} == {"n1"}
    assert infos[0]["StartTime"] <= infos[1]["EndTime"] and infos[1]["StartTime"] <= infos[0]["EndTime"]
    addresses = [(tmp_path / f"addr-{j}").read_text().strip() for j in ids]
    assert len(set(addresses)) == 2, addresses
    for j in ids:
        assert_no_ray_left(j)


def test_a_head_port_taken_as_ray_starts_is_tried_again(cluster, tmp_path):
    """Another job can take the probed port between the probe and `ray start --head` (it probed at
    the same moment): the head fails to bind, and the script starts it again on the next free pair.
    Here the test takes the port as soon as the job names it, before Ray binds it."""
    script = tmp_path / "cluster.sbatch"
    script.write_text(CLUSTER_ONLY)
    log = tmp_path / "cluster.out"
    job = cluster.submit(str(script), sbatch=("--nodes=1", *TWO_NODES[1:]), out=log)
    deadline = time.time() + 120
    while not (found := re.search(r"Ray head on n1 \(127\.0\.0\.2:(\d+)\)", log.read_text() if log.exists() else "")):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("RUNNING", "PENDING"), \
            log.read_text() if log.exists() else ""
        time.sleep(0.01)
    taken = int(found[1])
    holder = socket.socket()
    try:
        try:
            holder.bind(("0.0.0.0", taken))
        except OSError:
            cluster.wait(job, timeout=240)
            pytest.skip("Ray bound its port before this test could take it")
        holder.listen()
        info = cluster.wait(job, timeout=240)
    finally:
        holder.close()
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert f"port {taken} or {taken + 1} on n1 was taken as Ray started" in text, text
    ports = [int(p) for p in re.findall(r"Ray head on n1 \(127\.0\.0\.2:(\d+)\)", text)]
    assert ports[0] == taken and len(ports) == 2 and ports[1] != taken, ports
    assert "1 node(s)" in text
    assert_no_ray_left(job)
