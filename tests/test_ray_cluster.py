"""Ray clusters: the private local one listens on loopback only; a two-node cluster (head and
worker started as separate ``ray start`` processes) runs a training with one rank per node."""

import csv
import ipaddress
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from liqe_dist.dist.local_group import free_local_port as free_port
from shard_fixtures import pack_csv, write_csv_dataset
from slurm_cluster import slurm_unavailable
from liqe_dist.config import to_dict
from liqe_dist.data.crops import CropConfig
from liqe_dist.dist.engine import OptimConfig
from liqe_dist.models.liqe.config import LIQEConfig
from liqe_dist.train.config import DatasetSpec, TrainConfig

pytestmark = pytest.mark.slow  # real processes: seconds to a minute each

RAY = str(Path(sys.executable).parent / "ray")
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # two loopback addresses: two "hosts" on one machine


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def listening() -> set[tuple[str, int]]:
    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="inet") if c.status == "LISTEN"}


def test_local_cluster_listens_on_loopback_only():
    import ray
    from liqe_dist.run.ray_train import start_local_cluster

    before = listening()
    start_local_cluster(2)
    try:
        assert ray.get(ray.remote(lambda: 41 + 1).remote()) == 42
        opened = listening() - before
    finally:
        ray.shutdown()
    assert opened, "the cluster opened no sockets?"
    assert all(is_loopback(ip) for ip, _ in opened), sorted(opened)


@pytest.fixture
def two_node_cluster():
    """A head node at 127.0.0.2 and a worker node at 127.0.0.3, 1 CPU each, token auth on."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # set by start_local_cluster in this process
    port = free_port()
    address = f"{HEAD_IP}:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats"]
    try:
        subprocess.run([RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={port}",
                        "--include-dashboard=false", *common], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([RAY, "start", f"--address={address}", f"--node-ip-address={WORKER_IP}", *common],
                       env=env, check=True, capture_output=True, timeout=120)
        yield address, env
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.skipif(slurm_unavailable() is None, reason="proven on a real SLURM cluster here: "
                    "test_slurm.py::test_training_job_on_two_nodes")
def test_training_on_two_nodes_places_one_rank_per_node(tmp_path, two_node_cluster):
    address, env = two_node_cluster
    shards = pack_csv(write_csv_dataset(tmp_path / "a", n_refs=10, per_ref=2, size=(224, 232)), tmp_path / "shards",
                      "a", shard_max_count=5)
    cfg = TrainConfig(datasets=[DatasetSpec("a", str(shards), 2)], model=LIQEConfig(name="liqe-tiny"),
                      optim=OptimConfig(lr=1e-4, zero_stage=1), crops=CropConfig(train_crops=1, eval_crops=2),
                      epochs=1, steps_per_epoch=3, checkpoint_every=3, workers=2, placement="STRICT_SPREAD",
                      eval_parts=("test",), out_dir=str(tmp_path / "runs"), name="two-nodes", shuffle_buffer=4)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    out = subprocess.run([sys.executable, "-m", "liqe_dist.cli", "train", "--config", str(tmp_path / "cfg.yaml"),
                          "--address", address], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "runs" / "two-nodes"
    nodes = {json.loads((run / "ranks" / f"rank-{r}.json").read_text())["node_ip"] for r in range(2)}
    assert nodes == {HEAD_IP, WORKER_IP}
    steps = list(csv.DictReader(open(run / "steps.csv")))
    assert [int(r["step"]) for r in steps] == [1, 2, 3]
    assert (run / "checkpoints" / "step-00000003" / "rank-1.pt").exists()
