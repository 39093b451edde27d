"""A shard set survives what happens to packing: a file changed in place, a second pack at the
same time, a full disk, Ctrl-C with worker processes, SIGKILL in the middle of a rebuild."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from conftest import photo
from liqe_dist.data.adapters import read_dataset
from liqe_dist.data.packing import PackConfig, PackingError, ShardSink, pack_records
from liqe_dist.data.verify import verify_shards


def dataset(root, n=12, size=(240, 240)):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo(*size, seed=i).save(root / f"{i}.png")
    (root / "labels.csv").write_text("path,mos\n" + "".join(f"{i}.png,{i}\n" for i in range(n)))
    return root / "labels.csv"


def pack(table, out, force=False, **cfg):
    return pack_records(read_dataset("csv", table, "d"), out, "d", {}, PackConfig(workers=1, **cfg), progress=False,
                        force=force)


def test_a_file_changed_in_place_is_repacked(tmp_path):
    table = dataset(tmp_path / "raw")
    out = tmp_path / "shards" / "d"
    assert not pack(table, out).skipped
    assert pack(table, out).skipped
    st = os.stat(tmp_path / "raw" / "3.png")  # same size, new modification time: re-saved in place
    os.utime(tmp_path / "raw" / "3.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert not pack(table, out).skipped


def test_a_second_pack_into_the_same_set_is_refused(tmp_path):
    table = dataset(tmp_path / "raw")
    out = tmp_path / "shards" / "d"
    out.parent.mkdir(parents=True)
    with open(out.parent / ".d.lock", "a") as held:  # another process packing this set
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(PackingError, match="another pack is writing this set"):
            pack(table, out)
    assert not pack(table, out).skipped  # released: packing works


def test_a_full_disk_leaves_the_previous_set_whole(tmp_path, monkeypatch):
    table = dataset(tmp_path / "raw")
    out = tmp_path / "shards" / "d"
    pack(table, out, shard_max_count=3)
    manifest = (out / "manifest.json").read_text()
    calls = {"n": 0}
    real_write = ShardSink.write

    def write_until_full(self, *args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, *args)

    monkeypatch.setattr(ShardSink, "write", write_until_full)
    with pytest.raises(PackingError, match=r"no space left on device while packing d; .* was left as it was"):
        pack(table, out, shard_max_count=3, force=True)
    assert (out / "manifest.json").read_text() == manifest and verify_shards(out, progress=False).ok
    assert sorted(p.name for p in out.parent.iterdir()) == ["d"]  # no build folder, no partials, no lock


@pytest.fixture
def slow_dataset(tmp_path):
    """600 paths to one 2000 x 2000 PNG (hard links): decoding them all takes many seconds."""
    root = tmp_path / "slow"
    root.mkdir()
    Image.effect_noise((2000, 2000), 60).convert("RGB").save(root / "0.png")
    for i in range(1, 600):
        os.link(root / "0.png", root / f"{i}.png")
    (root / "labels.csv").write_text("path,mos\n" + "".join(f"{i}.png,{i % 7}\n" for i in range(600)))
    return root / "labels.csv"


def _as_from_a_terminal() -> None:
    # An ignored SIGINT is inherited, and earlier tests (Ray, spawned ranks) can leave pytest
    # ignoring it; Python then never installs its Ctrl-C handler. A terminal's job has the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_pack(table, out_root):
    return subprocess.Popen([sys.executable, "-m", "liqe_dist.cli", "pack", "csv", str(table), "--name", "d",
                             "--out", str(out_root), "--workers", "2", "--no-progress"],
                            start_new_session=True, preexec_fn=_as_from_a_terminal,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_shards(build, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if build.exists() and any(build.glob("*.tar.partial")):
            return
        time.sleep(0.2)
    raise AssertionError(f"packing never started writing: {proc.communicate()[0] if proc.poll() is not None else ''}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_an_interrupted_rebuild_keeps_the_old_set(tmp_path, slow_dataset, sig):
    out_root = tmp_path / "shards"
    pack(dataset(tmp_path / "small"), out_root / "d")  # the good set a rebuild must not lose
    before = json.loads((out_root / "d" / "manifest.json").read_text())
    proc = start_pack(slow_dataset, out_root)
    wait_for_shards(out_root / ".d.building", proc)
    os.killpg(proc.pid, sig)  # Ctrl-C reaches the whole process group, workers included
    start = time.monotonic()
    output = proc.communicate(timeout=30)[0]
    assert time.monotonic() - start < 15, "packing did not stop promptly"
    with pytest.raises(ProcessLookupError):  # no worker left behind
        for _ in range(50):
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
    assert json.loads((out_root / "d" / "manifest.json").read_text()) == before
    assert verify_shards(out_root / "d", progress=False).ok
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in output
        assert not (out_root / ".d.building").exists()  # cleaned up on the way out
    else:  # nothing could clean up; the next pack does
        assert (out_root / ".d.building").exists()
        pack(dataset(tmp_path / "small"), out_root / "d", force=True)
        assert not (out_root / ".d.building").exists()
