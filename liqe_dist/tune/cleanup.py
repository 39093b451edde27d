"""Removing the Ray placement groups of ended trials.

A Train V2 trial's worker group lives in a placement group owned by the search's driver, not by
the trial: when ASHA stops a trial (or it fails), Tune ends the trial's process but the group
stays, holding its CPUs, until the driver exits; the next trials then wait forever for workers
(ray-project/ray#54305). Ray's own cleaner needs the dashboard and still races (#62753). Every
rank records its group in ``RUN/ranks/rank-R.json``; the search removes a trial's groups when
the trial ends, and all of the experiment's at the end.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger("liqe_dist.tune")


def recorded_groups(run_dir: str | Path) -> set[str]:
    """Placement group ids (hex) the ranks of a run recorded."""
    out = set()
    for path in sorted(Path(run_dir).glob("ranks/rank-*.json")):
        try:
            group = json.loads(path.read_text()).get("placement_group")
        except (OSError, ValueError):
            continue
        if isinstance(group, str) and len(group) <= 64:
            out.add(group)
    return out


def live_groups(ids: set[str]) -> set[str]:
    """Those of ``ids`` that Ray has not removed."""
    import ray

    table = ray.util.placement_group_table()
    return {i for i in ids if i in table and table[i]["state"] != "REMOVED"}


def remove_groups(run_dir: str | Path) -> int:
    """Remove the live placement groups a run recorded; returns how many were removed."""
    import ray
    from ray.util.placement_group import PlacementGroup

    removed = 0
    for group in sorted(live_groups(recorded_groups(run_dir))):
        try:
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group))))
            removed += 1
        except Exception as exc:  # already gone, or the cluster is going away
            log.debug("could not remove placement group %s: %s", group, exc)
    if removed:
        log.debug("removed %d placement group(s) of %s", removed, run_dir)
    return removed


def experiment_groups(experiment_dir: str | Path) -> set[str]:
    """Placement groups recorded by any trial of an experiment."""
    from liqe_dist.tune.results import trial_dirs

    out = set()
    for trial in trial_dirs(Path(experiment_dir)):
        out |= recorded_groups(trial)
    return out
