#!/usr/bin/env python
"""gMAD study server benchmark: how many participants can answer at once.

Starts ``liqe-dist gmad study`` (waitress, SQLite WAL, synchronous=FULL) on a generated pairs
file (``--pairs`` pairs of 512 x 384 PNG images) and lets C simulated participants (threads, no
think time) go through all their trials at once. One trial is what a browser does: POST the
answer (committed before the reply), GET the next trial's page and both its images. Prints, per
concurrency, trials/s and the p50/p95 time of one trial, against the same run's baseline: the
same round trip without the write (GET of the page and the two images).

    bash launch/bench.sh study [--pairs 200] [--concurrency 1,4,16]
"""

from __future__ import annotations

import argparse
import csv
import http.client
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def make_pairs(out: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (out / "images").mkdir(parents=True)
    cols = ["pair", "defender", "attacker", "level", "best_key", "worst_key", "best_source", "worst_source"]
    with open(out / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for k in range(n):
            w.writerow([k, "a" if k % 2 else "b", "b" if k % 2 else "a", k % 6, f"k{k}b", f"k{k}w", f"{k}b", f"{k}w"])
            for side in ("best", "worst"):
                small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                Image.fromarray(small).resize((512, 384), Image.BILINEAR).save(out / "images" / f"{k:05d}_{side}.png")
    return out / "pairs.csv"


class Client:
    def __init__(self, port: int) -> None:
        self.con = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, form: dict | None = None) -> tuple[int, bytes, dict]:
        body = urllib.parse.urlencode(form) if form is not None else None
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if form is not None else {}
        self.con.request(method, path, body, headers)
        r = self.con.getresponse()
        return r.status, r.read(), dict(r.getheaders())


def token_of(page: bytes) -> str:
    """The anti-forgery token a page's form carries."""
    return re.search(rb'name="token" value="([0-9a-f]+)"', page).group(1).decode()


def trial_round_trip(c: Client, who: str, position: int, write: bool, token: str) -> None:
    if write:
        form = {"answer": "left", "position": str(position), "token": token}
        status, _, _ = c.call("POST", f"/p/{who}/answer", form)
        assert status == 303, status
    status, page, _ = c.call("GET", f"/p/{who}")
    assert status == 200, status
    for src in re.findall(rb'src="(/p/[^"]+)"', page):
        assert c.call("GET", src.decode())[0] == 200


def participant(port: int, who: str, write: bool, times: list[float]) -> None:
    from liqe_dist.gmad.study_db import StudySettings, practice_plan

    c = Client(port)
    start_token = token_of(c.call("GET", "/")[1])
    assert c.call("POST", "/start", {"participant": who, "token": start_token})[0] == 303
    token = token_of(c.call("GET", f"/p/{who}")[1])
    for step in practice_plan(who, StudySettings(scale="buttons", schedule="random")):
        form = {"answer": step.better or "same", "step": str(step.step), "token": token}
        assert c.call("POST", f"/p/{who}/practice", form)[0] == 303
    status, page, _ = c.call("GET", f"/p/{who}")
    total = int(re.search(rb'max="(\d+)"', page).group(1))
    for position in range(total):
        t0 = time.perf_counter()
        trial_round_trip(c, who, position, write, token)
        times.append(time.perf_counter() - t0)


def run(port: int, concurrency: int, write: bool, tag: str) -> tuple[float, float, float]:
    times: list[float] = []
    threads = [threading.Thread(target=participant, args=(port, f"{tag}{i}", write, times))
               for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return len(times) / wall, float(np.percentile(times, 50)) * 1e3, float(np.percentile(times, 95)) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--concurrency", default="1,4,16")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        pairs = make_pairs(Path(tmp) / "g", args.pairs)
        server = subprocess.Popen([sys.executable, "-m", "liqe_dist.cli", "gmad", "study", str(pairs), "--db",
                                   str(Path(tmp) / "study.sqlite"), "--port", "0", "--threads", "16",
                                   "--scale", "buttons", "--schedule", "random"],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
        try:
            port = None
            for line in server.stdout:
                found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
                if found:
                    port = int(found.group(1))
                    break
            if port is None:
                raise SystemExit("the study server did not start")
            threading.Thread(target=server.stdout.read, daemon=True).start()
            print(f"# gMAD study server: {args.pairs} pairs (+10 % repeated), 512x384 PNGs; one trial = POST answer "
                  f"+ GET page + 2 images; no think time")
            print(f"{'participants':>12} {'trials/s':>9} {'p50 ms':>7} {'p95 ms':>7} {'read-only trials/s':>19} "
                  f"{'p50 ms':>7} {'write cost (p50)':>17}")
            for c in (int(x) for x in args.concurrency.split(",")):
                rate, p50, p95 = run(port, c, True, f"w{c}-")
                base_rate, base50, _ = run(port, c, False, f"r{c}-")
                print(f"{c:>12} {rate:>9.1f} {p50:>7.1f} {p95:>7.1f} {base_rate:>19.1f} {base50:>7.1f} "
                      f"{p50 / base50:>16.2f}x")
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
