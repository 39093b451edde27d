"""What a training run leaves for people: readable log lines, CSVs, and plots.

``steps.csv`` (one row per step), ``eval.csv`` (one row per evaluation), ``tb/`` (the same
scalars for TensorBoard: ``tensorboard --logdir RUN_DIR/tb``), ``events.jsonl``
(start/resume/finish), ``predictions/step-N.csv`` (test-split scores), and at the end
``curves.png`` (losses and task weights over steps) and ``scatter.png`` (score vs MOS per
dataset, from the last test evaluation). Only rank 0 writes.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

from liqe_dist.tables import csv_writer

log = logging.getLogger("liqe_dist.train")


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool = True, every: int = 10, total_steps: int | None = None,
                 start_step: int = 0):
        """``start_step``: the step a run goes on from (0: a new run); TensorBoard drops the events
        after it (steps a crashed run did past its last checkpoint, or before any), so no step
        shows twice."""
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.every = every
        self.total_steps = total_steps
        self._clock: tuple[float, int] | None = None  # (time, step) of the first step logged here
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1)

    def _scalars(self, m: dict) -> None:
        for k, v in m.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, global_step=int(m["step"]))
        self._tb.flush()

    def _append(self, name: str, row: dict) -> None:
        path = self.dir / name
        new = not path.exists()
        fields = list(row)
        if not new:
            with open(path) as f:
                fields = next(csv.reader(f), fields)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def rewind(self, step: int) -> int:
        """Drop rows after ``step`` (steps a crashed run did after its last checkpoint, about to
        be redone), so every step appears once; returns how many step rows were dropped."""
        if not self.enabled:
            return 0
        dropped = 0
        for name in ("steps.csv", "eval.csv"):
            path = self.dir / name
            if not path.exists():
                continue
            rows = list(csv.DictReader(open(path)))
            keep = [r for r in rows if int(r["step"]) <= step]
            if name == "steps.csv":
                dropped = len(rows) - len(keep)
            if len(keep) != len(rows):
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(keep)
        return dropped

    def event(self, row: dict) -> None:
        if self.enabled:
            with open(self.dir / "events.jsonl", "a") as f:
                f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **row}) + "\n")

    def step(self, m: dict) -> None:
        if not self.enabled:
            return
        self._append("steps.csv", m)
        self._scalars(m)
        now = time.monotonic()
        if self._clock is None:
            self._clock = (now, m["step"])
        if m["step"] % self.every == 0 or m["step"] == 1:
            losses = " ".join(f"{k.removeprefix('loss/')} {v:.4f}" for k, v in m.items() if k.startswith("loss/"))
            lams = " ".join(f"{v:.3f}" for k, v in m.items() if k.startswith("lambda/"))
            log.info("step %d%s (epoch %d)  loss %.4f [%s]  lambda [%s]  lr %.2e  %.1f img/s%s%s", m["step"],
                     f"/{self.total_steps}" if self.total_steps else "", m["epoch"], m["loss"], losses, lams, m["lr"],
                     m["images_per_second"], f"  skipped {m['skipped_samples']}" if m["skipped_samples"] else "",
                     self._eta(now, m["step"]))

    def _eta(self, now: float, step: int) -> str:
        """``  ETA 3m20s`` from the mean wall-clock per step so far (evaluations included)."""
        t0, step0 = self._clock
        if not self.total_steps or step <= step0:
            return ""
        left = (now - t0) / (step - step0) * (self.total_steps - step)
        return f"  ETA {int(left // 60)}m{int(left % 60):02d}s"

    def eval(self, m: dict) -> None:
        if not self.enabled:
            return
        row = {k: v for k, v in m.items() if k in ("step", "epoch") or k.startswith(("val/", "test/"))}
        self._append("eval.csv", row)
        self._scalars(row)
        parts = [f"{k} {v:.3f}" for k, v in row.items() if k.endswith(("srcc", "plcc")) and "/mean" not in k]
        log.info("eval at step %d: %s", m["step"], "  ".join(parts))

    def predictions(self, step: int, results: dict) -> None:
        if not self.enabled:
            return
        folder = self.dir / "predictions"
        folder.mkdir(exist_ok=True)
        with open(folder / f"step-{step:08d}.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
            w = csv_writer(f)  # keys come from file names: escaped against formula injection
            w.writerow(["dataset", "key", "score", "mos"])
            for name, ev in results.items():
                for k, s, mos in zip(ev.keys, ev.score, ev.mos):
                    w.writerow([name, k, round(float(s), 6), mos])

    def plots(self) -> None:
        """``curves.png`` (losses, weights, eval SRCC) and ``scatter.png`` from the CSVs (rank 0, end of run)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if (self.dir / "steps.csv").exists():  # none when nothing was trained (epochs: 0)
            self._curves(plt)
        self._scatter(plt)

    def _curves(self, plt) -> None:
        rows = list(csv.DictReader(open(self.dir / "steps.csv")))
        steps = [int(r["step"]) for r in rows]
        fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4))
        for key in rows[0]:
            if key.startswith("loss/") or key == "loss":
                a.plot(steps, [float(r[key]) if r[key] else float("nan") for r in rows], label=key)
            if key.startswith("lambda/"):
                b.plot(steps, [float(r[key]) for r in rows], label=key[7:])
        a.set(xlabel="step", ylabel="loss", title="training losses")
        b.set(xlabel="step", ylabel="weight", title="task weights (lambda)")
        if (self.dir / "eval.csv").exists():
            evals = list(csv.DictReader(open(self.dir / "eval.csv")))
            for key in evals[0] if evals else []:
                if key.endswith("/srcc") and "/mean" not in key:
                    c.plot([int(r["step"]) for r in evals], [float(r[key]) if r[key] else float("nan") for r in evals],
                           marker="o", label=key[:-5])
        c.set(xlabel="step", ylabel="SRCC", title="evaluation (per dataset and part)")
        for ax in (a, b, c):
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
        fig.tight_layout()
        fig.savefig(self.dir / "curves.png", dpi=110)
        plt.close(fig)

    def _scatter(self, plt) -> None:
        preds = sorted((self.dir / "predictions").glob("step-*.csv"))
        if not preds:
            return
        data: dict[str, list[tuple[float, float]]] = {}
        for r in csv.DictReader(open(preds[-1])):
            if r["mos"] not in ("", "nan"):
                data.setdefault(r["dataset"], []).append((float(r["score"]), float(r["mos"])))
        fig, axes = plt.subplots(1, len(data), figsize=(4.5 * len(data), 4), squeeze=False)
        for ax, (name, pts) in zip(axes[0], data.items()):
            ax.scatter([p[1] for p in pts], [p[0] for p in pts], s=12, alpha=0.7)
            ax.set(xlabel="MOS", ylabel="predicted quality q_hat", title=f"{name} (test, {preds[-1].stem})")
        fig.tight_layout()
        fig.savefig(self.dir / "scatter.png", dpi=110)
        plt.close(fig)
