"""Logging set-up shared by the command line, the demo and the benchmarks."""

from __future__ import annotations

import logging


def _drop_open_clip_random_weights_notice(record: logging.LogRecord) -> bool:
    # open_clip logs this for every model built without weights; our callers say it once.
    return "No pretrained weights loaded" not in record.getMessage()


def setup_logging(verbose: bool = False) -> None:
    """Readable timestamped lines; our loggers at INFO (DEBUG with ``verbose``), everything
    else at WARNING (open_clip and ray log chatty INFO lines through the root logger)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("liqe_dist").setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_open_clip_random_weights_notice)
