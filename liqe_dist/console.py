"""What reaches a person's terminal: this project's log lines, readable; library chatter goes to
files.

``setup_logging`` (command line, demo, benchmarks): timestamped lines, our loggers at INFO,
everything else at WARNING. In a Ray Train worker, :func:`route_worker_output` sends all the
process prints (torch, DeepSpeed, Ray's per-report echo) to ``RUN/logs/rank-R.log`` and our
lines also to ``RUN/logs/console.log``, which the driver shows as it grows
(:func:`follow_console`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
CONSOLE_LOG = "console.log"


def _drop_open_clip_random_weights_notice(record: logging.LogRecord) -> bool:
    # open_clip logs this for every model built without weights; our callers say it once.
    return "No pretrained weights loaded" not in record.getMessage()


def setup_logging(verbose: bool = False) -> None:
    """Readable timestamped lines; our loggers at INFO (DEBUG with ``verbose``), everything
    else at WARNING (open_clip and ray log chatty INFO lines through the root logger)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format=FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger("liqe_dist").setLevel(logging.DEBUG if verbose else logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_open_clip_random_weights_notice)


def route_worker_output(log_dir: Path, rank: int) -> None:
    """In a training worker process: its standard output and error (every library's prints and
    warnings) go to ``LOG_DIR/rank-R.log``; this project's lines go there too and to
    ``LOG_DIR/console.log`` (rank 0 from INFO, other ranks warnings and errors only)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log_dir / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    console = logging.FileHandler(log_dir / CONSOLE_LOG)  # appends; lines from ranks interleave whole
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter(FORMAT.replace("%(name)s", f"%(name)s[rank {rank}]"), DATE_FORMAT))
    console.addFilter(_drop_open_clip_random_weights_notice)
    logging.getLogger("liqe_dist").addHandler(console)


@contextmanager
def follow_console(log_dir: str | Path, out=None, poll_s: float = 0.5) -> Iterator[None]:
    """Print the lines added to ``LOG_DIR/console.log`` while the block runs (the driver of a
    training run showing its workers' lines), and the rest when it ends."""
    path = Path(log_dir) / CONSOLE_LOG
    out = out or sys.stderr
    start = path.stat().st_size if path.exists() else 0  # a resumed run: only the new lines
    stop = threading.Event()

    def pump() -> None:
        pos = start
        while True:
            done = stop.is_set()
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read()
                end = chunk.rfind(b"\n") + 1  # whole lines only
                if end:
                    out.write(chunk[:end].decode("utf-8", "replace"))
                    out.flush()
                    pos += end
            if done:
                return
            stop.wait(poll_s)

    thread = threading.Thread(target=pump, name="console-follower", daemon=True)
    thread.start()
    try:
        yield
    finally:
        time.sleep(poll_s)  # lines the workers wrote just before the run ended
        stop.set()
        thread.join()
