"""Set-up run in every process of a Ray cluster this project starts or joins
(``worker_process_setup_hook``). It imports nothing heavy: Ray's helper actors load it too."""

from __future__ import annotations

import logging

RUNTIME_ENV = {"worker_process_setup_hook": "liqe_dist.run.ray_process.quiet_ray_process"}


def quiet_ray_process() -> None:
    """Train V2's placement-group cleaner asks Ray's state API, served by the dashboard, whether
    the controller still lives; without the dashboard (not installed here) it warns every
    second for the whole run."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
