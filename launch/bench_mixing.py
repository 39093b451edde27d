#!/usr/bin/env python
"""Mixing benchmark: how often a training batch pairs two versions of one reference photograph,
for shards packed in source order and in the default shuffled order, across shuffle buffers;
ratios against a uniform shuffle of the same training part (the reference code's DataLoader).

A KADID-10k-like set (81 references x 25 types x 5 levels, tiny images) is packed in a
temporary folder. Prints a Markdown table.

    bash launch/bench.sh mixing [--batch 16] [--world 1]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from liqe_dist.data.mixing import kadid_like_records, same_reference_rate
from liqe_dist.data.packing import PackConfig, pack_records
from liqe_dist.hardware import describe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="per-rank batch size (KADID-10k's in the reference: 16)")
    ap.add_argument("--world", type=int, default=1, help="ranks")
    ap.add_argument("--buffers", default="1,16,256,1024,4096")
    args = ap.parse_args()
    print(describe(), flush=True)  # the hardware the numbers below belong to
    buffers = [int(b) for b in args.buffers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        records = kadid_like_records()
        rows = []
        for order in ("source", "shuffled"):
            pack_records(records, Path(tmp) / order, "kadid", {}, PackConfig(order=order), progress=False)
            for buffer in buffers:
                rate, uniform = same_reference_rate(Path(tmp) / order, args.batch, buffer, args.world)
                rows.append((order, buffer, rate, uniform))
    print(f"\nsame-reference pairs in training batches of {args.batch} per rank, {args.world} rank(s), "
          f"2 epochs; KADID-like set, {len(records)} images, split 0\n")
    print("| record order | shuffle buffer | same-reference pairs | uniform shuffle | ratio |")
    print("|---|---|---|---|---|")
    for order, buffer, rate, uniform in rows:
        print(f"| {order} | {buffer} | {100 * rate:.2f} % | {100 * uniform:.2f} % | {rate / uniform:.2f}x |")


if __name__ == "__main__":
    main()
