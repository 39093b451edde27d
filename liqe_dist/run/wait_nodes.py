"""Wait until a Ray cluster has a number of live nodes (SLURM jobs start one node per machine and
must not run their command before every node has joined).

    python -m liqe_dist.run.wait_nodes HEAD:PORT NODES [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def live_nodes() -> list[str]:
    import ray

    return sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])


def wait_nodes(address: str, nodes: int, timeout: float) -> list[str]:
    """Connect to ``address`` (retrying while the head starts) and wait for ``nodes`` live nodes;
    returns their addresses. Raises TimeoutError naming the nodes that did join."""
    import ray

    from liqe_dist.run.ray_train import QUIET, TOKEN_NOTICE_LOGGER

    logging.getLogger(TOKEN_NOTICE_LOGGER).setLevel(logging.ERROR)
    deadline = time.monotonic() + timeout
    while True:
        try:
            ray.init(address=address, **QUIET)
            break
        except ConnectionError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no Ray head at {address} after {timeout:g} s: {exc}") from None
            time.sleep(2)
    try:
        while len(joined := live_nodes()) < nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(joined)} of {nodes} Ray nodes joined {address} within {timeout:g} s: "
                                   f"{', '.join(joined) or 'none'}; see each node's ray start log")
            time.sleep(1)
        return joined
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address")
    p.add_argument("nodes", type=int)
    p.add_argument("--timeout", type=float, default=180)
    args = p.parse_args(argv)
    try:
        joined = wait_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Ray cluster at {args.address}: {len(joined)} node(s) ({', '.join(joined)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
