"""Scoring packed shards with several models in one pass, one shard at a time, exactly once.

Work unit = one shard. Each image is decoded once, cropped once per distinct crop rule and
scored by every model (crops stay uint8 until the device normalises them). A shard's results go
to ``OUT/<shard>.parquet`` through a temporary file and a rename, so a file that exists is
complete; a shard whose file exists is skipped. A killed job rerun therefore scores only what
is missing, and every image appears exactly once in the union of the files (at-least-once work,
exactly-once results). An image that cannot be decoded gets a row with its ``error`` and NaN
scores, so the union still holds every key.

Columns: ``key, shard, source, width, height`` (the stored image's size, px), ``content_hash``
(for corpus shards; "" otherwise), ``error`` ("" when scored), then per model ``NAME`` (quality,
1-5) and, per head of its family, ``NAME_<head>`` (most likely label) and ``NAME_<head>_prob``.

``OUT/manifest.json`` names the models (checkpoint path and sha256, family, precision), the
shard sets and the counts; scoring into a folder written by other models is refused.

Workers: Ray actors (one per GPU, or one per ``cpus_per_worker`` CPUs) take shards from the
driver's queue; a worker that dies loses only its shard in flight, which goes back to the queue
and is scored by another worker (a shard that kills ``MAX_ATTEMPTS`` workers is reported and
left out). ``workers=0`` scores in this process (small jobs, no Ray). Inside a worker, images
are decoded and cropped in ``decode_workers`` processes while the models run (by default on
GPU workers, whose device would otherwise wait for JPEG decoding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import IterableDataset
from tqdm import tqdm

from liqe_dist.files import atomic_path

log = logging.getLogger("liqe_dist.score_shards")

MANIFEST = "manifest.json"
FORMAT = "liqe-dist/scores-1"
BASE_COLUMNS = ("key", "shard", "source", "width", "height", "content_hash", "error")
MAX_ATTEMPTS = 3
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class ScoreShardsError(ValueError):
    """The job cannot run as asked (bad model argument, foreign output folder, no shards)."""


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model NAME=CHECKPOINT``."""

    name: str
    checkpoint: str

    @staticmethod
    def parse(arg: str) -> "ModelSpec":
        name, sep, path = arg.partition("=")
        if not sep or not path:
            raise ScoreShardsError(f"--model {arg!r}: expected NAME=CHECKPOINT")
        if not _NAME.match(name) or name in BASE_COLUMNS:
            raise ScoreShardsError(f"--model {arg!r}: the name must be a letter then letters, digits, _ or - "
                                   f"(and not one of {', '.join(BASE_COLUMNS)})")
        if not Path(path).is_file():
            raise ScoreShardsError(f"--model {arg!r}: {path}: no such file")
        return ModelSpec(name, path)


@dataclass(frozen=True)
class ShardJob:
    path: str          # the tar file
    out: str           # its parquet file
    samples: int | None  # from the set's manifest (None for a bare tar)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_shards(inputs: list[str | Path], out_dir: Path) -> tuple[list[ShardJob], list[str]]:
    """Shards of packed sets (folders with a manifest) or bare ``.tar`` files, each with its
    output file; also the sets' names. Two shards with one file name are an error."""
    from liqe_dist.data.packing import read_manifest

    jobs, sets = [], []
    for item in map(Path, inputs):
        if item.is_dir():
            manifest = read_manifest(item)
            sets.append(manifest["dataset"])
            jobs += [ShardJob(str(item / s["name"]), "", s["samples"]) for s in manifest["shards"]]
        elif item.suffix == ".tar" and item.is_file():
            jobs.append(ShardJob(str(item), "", None))
        else:
            raise ScoreShardsError(f"{item}: not a packed shard set (folder with manifest.json) or a .tar shard")
    seen: dict[str, str] = {}
    out = []
    for job in jobs:
        stem = Path(job.path).name.removesuffix(".tar")
        if stem in seen:
            raise ScoreShardsError(f"two shards named {stem}.tar ({seen[stem]}, {job.path}): their results would "
                                   "share one file; score them into different --out folders")
        seen[stem] = job.path
        out.append(ShardJob(job.path, str(out_dir / f"{stem}.parquet"), job.samples))
    if not out:
        raise ScoreShardsError("no shards to score")
    return out, sets


class ShardSamples(IterableDataset):
    """The samples of one shard, decoded and cropped: ``(index in the shard, fields, crops)``
    where ``fields`` holds key, shard, source, content_hash, width, height and error, and
    ``crops`` is one uint8 ``[U, 3, S, S]`` tensor per crop rule (None when the image failed).
    In a DataLoader with n workers, worker w takes the samples whose index is w mod n."""

    def __init__(self, path: str, crop_cfgs: list):
        self.path, self.crop_cfgs = path, crop_cfgs

    def __iter__(self):
        from torch.utils.data import get_worker_info

        from liqe_dist.data.stream import iter_shard

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, raw in enumerate(iter_shard(Path(self.path))):
            if index % workers == worker:
                yield (index, *decode_sample(raw, self.crop_cfgs, self.path))


def decode_sample(raw, crop_cfgs: list, path: str) -> tuple[dict, list | None]:
    """(row fields, crops per crop rule or None) of one shard sample; never raises for a bad image."""
    from liqe_dist.data.crops import ImageShapeError, eval_crop_sets
    from liqe_dist.data.images import ImageDecodeError, decode_image

    where = f"{path}:{raw.key}"
    try:
        meta = json.loads(raw.fields.get("json", b"{}"))
        meta = meta if isinstance(meta, dict) else {}
    except ValueError:
        meta = {}
    fields = {"key": raw.key, "shard": Path(path).name, "source": str(meta.get("source", "")),
              "content_hash": str(meta.get("content_hash", ""))}
    images = [k for k in raw.fields if k != "json"]
    try:
        if len(images) != 1:
            raise ImageDecodeError(where, f"expected one image in the sample, found {images}")
        img = decode_image(raw.fields[images[0]], where)
        fields["width"], fields["height"] = img.size
        return fields, [c.pixels for c in eval_crop_sets(img, crop_cfgs, where)]
    except (ImageDecodeError, ImageShapeError) as exc:
        fields["error"] = getattr(exc, "reason", None) or str(exc)
        return fields, None


class ShardScorer:
    """The models of one worker, and how it scores a shard into a table."""

    def __init__(self, models: list[ModelSpec], precision: str = "auto", device: str = "auto",
                 batch_images: int | None = None, eval_crops: int | None = None, decode_workers: int = 0):
        import torch

        from liqe_dist.eval.scoring import Scorer, default_crops
        from liqe_dist.hardware import resolve_device, resolve_precision
        from liqe_dist.models.registry import load_model

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, str(self.device))
        self.names = [m.name for m in models]
        self.scorers = []
        for spec in models:
            model = load_model(spec.checkpoint, precision=self.precision)
            crops = default_crops(model, **({"eval_crops": eval_crops} if eval_crops else {}))
            scorer = Scorer(model, crops, batch_images=batch_images, device=self.device)
            # warm up on one full batch: LIQE encodes (and caches) its 495 prompts on first use, and
            # the first pass at a batch shape is slower (kernel selection, allocator)
            with torch.inference_mode():
                for _ in range(2):
                    scorer.predict(torch.zeros(scorer.batch_images, crops.eval_crops, 3, crops.size, crops.size,
                                               dtype=torch.uint8))
            self.scorers.append(scorer)
        self.families = {n: s.model.family for n, s in zip(self.names, self.scorers)}
        self.batch_images = self.scorers[0].batch_images  # None: default_batch_images of the device
        self.decode_workers = decode_workers
        self._torch = torch

    def columns(self) -> dict[str, object]:
        """Column name -> the value of a row the models did not score."""
        cols: dict[str, object] = {"key": "", "shard": "", "source": "", "width": 0, "height": 0,
                                   "content_hash": "", "error": ""}
        for name, scorer in zip(self.names, self.scorers):
            cols[name] = math.nan
            for head in scorer.model.heads:
                cols[f"{name}_{head}"], cols[f"{name}_{head}_prob"] = "", math.nan
        return cols

    def score_shard(self, path: str | Path):
        """``pyarrow.Table`` with one row per sample of the shard (see the module docstring), in
        shard order. With ``decode_workers`` > 0, images are decoded and cropped in that many
        processes while the models run (each takes every n-th sample)."""
        import pyarrow as pa
        from torch.utils.data import DataLoader

        defaults = self.columns()
        table: dict[str, list] = {c: [] for c in defaults}
        order: list[int] = []  # each row's position in the shard
        samples = ShardSamples(str(path), [s.crops for s in self.scorers])
        if self.decode_workers > 0:
            samples = DataLoader(samples, batch_size=None, num_workers=self.decode_workers, prefetch_factor=4)
        batch: list[tuple[int, list]] = []  # (row, crops per model)

        def flush() -> None:
            if not batch:
                return
            with self._torch.inference_mode():
                for m, (name, scorer) in enumerate(zip(self.names, self.scorers)):
                    pixels = self._torch.stack([crops[m] for _, crops in batch])
                    for (row, _), (quality, *pairs) in zip(batch, scorer.predict(pixels).tolist()):
                        if not math.isfinite(quality):
                            table["error"][row] = f"{name}: the score is not a number (are its weights NaN?)"
                        table[name][row] = quality
                        for h, (head, labels) in enumerate(scorer.model.heads.items()):
                            table[f"{name}_{head}"][row] = labels[int(pairs[2 * h + 1])]
                            table[f"{name}_{head}_prob"][row] = pairs[2 * h]
            batch.clear()

        for index, fields, crops in samples:
            row = len(order)
            order.append(int(index))
            for col, value in defaults.items():
                table[col].append(fields.get(col, value))
            if crops is not None:
                batch.append((row, crops))
            if len(batch) >= self.batch_images:
                flush()
        flush()
        rows = sorted(range(len(order)), key=order.__getitem__)
        types = {c: pa.float64() if isinstance(v, float) else pa.int32() if isinstance(v, int) else pa.string()
                 for c, v in defaults.items()}
        return pa.table({c: pa.array([v[r] for r in rows], type=types[c]) for c, v in table.items()})

    def score_to_file(self, job: ShardJob) -> dict:
        """Score one shard into its parquet file (temp file + rename); returns counts and timing."""
        import pyarrow.parquet as pq

        started = time.perf_counter()
        table = self.score_shard(job.path)
        with atomic_path(job.out) as tmp:
            pq.write_table(table, tmp)
        errors = sum(1 for e in table.column("error").to_pylist() if e)
        return {"shard": job.path, "images": table.num_rows, "errors": errors,
                "seconds": time.perf_counter() - started, "precision": self.precision, "device": str(self.device)}


@dataclass
class ScoreSummary:
    shards: int = 0          # scored now
    skipped: int = 0         # already scored by an earlier run
    images: int = 0          # scored now
    errors: int = 0          # images that could not be scored (rows with an error)
    busy_seconds: float = 0.0  # summed over workers: time spent scoring shards (start-up excluded)
    failed: list[str] = field(default_factory=list)   # shards left out after MAX_ATTEMPTS
    short: list[str] = field(default_factory=list)    # shards with fewer rows than their manifest says


def _check_manifest(out_dir: Path, models: list[ModelSpec], digests: dict[str, str], precision: str,
                    eval_crops: int | None, sets: list[str], jobs: list[ShardJob]) -> dict:
    """Write the scores' manifest, or check that an existing one names the same models."""
    from liqe_dist.models.weights import file_family, read_metadata

    path = out_dir / MANIFEST
    entry = {}
    for m in models:
        meta = read_metadata(m.checkpoint)  # the header only: the workers load the tensors
        entry[m.name] = {"checkpoint": str(Path(m.checkpoint).resolve()), "sha256": digests[m.name],
                         "family": file_family(meta, m.checkpoint)}
    if path.exists():
        old = json.loads(path.read_text())
        before = {n: e["sha256"] for n, e in old.get("models", {}).items()}
        now = {n: e["sha256"] for n, e in entry.items()}
        if (old.get("format") != FORMAT or before != now or old.get("precision_requested") != precision
                or old.get("eval_crops") != eval_crops):
            raise ScoreShardsError(f"{out_dir} holds scores of other models, precision or crops ({path}: "
                                   f"{sorted(before)}, {old.get('precision_requested')}, eval_crops "
                                   f"{old.get('eval_crops')}); score into another --out")
        return old
    manifest = {"format": FORMAT, "models": entry, "precision_requested": precision,
                "eval_crops": eval_crops,  # None: each family's own count (LIQE 15, PMT-IQA 4)
                "shard_sets": sets,
                "inputs": sorted({str(Path(j.path).resolve().parent) for j in jobs}
                                 | {str(Path(j.path).resolve()) for j in jobs if j.samples is None}),
                "shards": len(jobs), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return manifest


def score_shards(inputs: list[str | Path], models: list[ModelSpec], out_dir: str | Path, workers: int = 0,
                 address: str | None = None, precision: str = "auto", device: str = "auto",
                 batch_images: int | None = None, cpus_per_worker: float = 1.0, eval_crops: int | None = None,
                 decode_workers: int | None = None, progress: bool = True) -> ScoreSummary:
    """Score every shard of ``inputs`` that ``out_dir`` lacks (see the module docstring).
    ``decode_workers``: decoding processes per worker (None: on GPU workers ``cpus_per_worker``
    - 1, so the GPU does not wait for JPEG decoding; on the CPU none, the worker's CPUs compute)."""
    if not models:
        raise ScoreShardsError("give at least one --model NAME=CHECKPOINT")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ScoreShardsError(f"model names must differ, got {names}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs, sets = find_shards(inputs, out_dir)
    digests = {m.name: file_sha256(m.checkpoint) for m in models}
    manifest = _check_manifest(out_dir, models, digests, precision, eval_crops, sets, jobs)
    todo = [j for j in jobs if not Path(j.out).exists()]
    summary = ScoreSummary(skipped=len(jobs) - len(todo))
    if summary.skipped:
        log.info("%d of %d shards already scored in %s; scoring the other %d", summary.skipped, len(jobs), out_dir,
                 len(todo))
    total = sum(j.samples or 0 for j in todo)
    bar = tqdm(total=total or None, unit="img", desc="scoring shards", disable=not progress, smoothing=0.05)
    runs: list[dict] = []

    def done(job: ShardJob, result: dict) -> None:
        summary.shards += 1
        summary.images += result["images"]
        summary.errors += result["errors"]
        summary.busy_seconds += result["seconds"]
        if job.samples is not None and result["images"] != job.samples:
            summary.short.append(f"{job.path}: {result['images']} rows, the manifest says {job.samples}")
            log.error("%s", summary.short[-1])
        runs.append(result)
        bar.update(result["images"])

    try:
        if workers <= 0:
            scorer = ShardScorer(models, precision, device, batch_images, eval_crops, decode_workers or 0)
            for job in todo:
                done(job, scorer.score_to_file(job))
        else:
            _score_on_ray(todo, models, workers, address, precision, device, batch_images, eval_crops,
                          cpus_per_worker, decode_workers, done, summary, bar)
    finally:
        bar.close()
    if runs:
        manifest.setdefault("runs", []).append({
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "shards": summary.shards, "images": summary.images,
            "errors": summary.errors, "failed": summary.failed,
            "precision": sorted({r["precision"] for r in runs}), "devices": sorted({r["device"] for r in runs})})
    manifest["complete"] = all(Path(j.out).exists() for j in jobs)
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return summary


def _score_on_ray(todo: list[ShardJob], models: list[ModelSpec], workers: int, address: str | None,
                  precision: str, device: str, batch_images: int | None, eval_crops: int | None,
                  cpus_per_worker: float, decode_workers: int | None, done,
                  summary: ScoreSummary, bar) -> None:
    """Shards from a queue to ``workers`` Ray actors; a dead actor's shard goes back to the queue."""
    import ray

    from liqe_dist.run.ray_train import connect

    connect(address, cpus=workers * cpus_per_worker)
    use_gpu = device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1
    options = {"num_cpus": cpus_per_worker, "num_gpus": 1 if use_gpu else 0}
    threads = max(1, int(cpus_per_worker))
    if decode_workers is None:
        decode_workers = threads - 1 if use_gpu else 0

    @ray.remote
    class ShardWorker:
        def __init__(self):
            import torch

            torch.set_num_threads(threads)
            self.error = ""
            try:  # reported by where(): a clear line instead of Ray's wrapped traceback
                self.scorer = ShardScorer(models, precision, device, batch_images, eval_crops, decode_workers)
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"

        def where(self) -> tuple[int, str, str]:
            return os.getpid(), ray.util.get_node_ip_address(), self.error

        def score(self, job: ShardJob) -> dict:
            return self.scorer.score_to_file(job)

    queue = deque(todo)
    attempts: dict[str, int] = {}
    actors: dict[int, object] = {}
    busy: dict[object, tuple[int, ShardJob]] = {}   # future -> (worker id, its shard)
    rates: dict[int, list[float]] = {}
    next_id = 0

    def start_worker() -> None:
        nonlocal next_id
        actor = ShardWorker.options(**options).remote()
        pid, node, error = ray.get(actor.where.remote())
        if error:
            ray.kill(actor)
            raise ScoreShardsError(f"a worker on {node} could not load the models: {error}")
        log.info("worker %d: pid %d on %s", next_id, pid, node)
        actors[next_id] = actor
        rates[next_id] = [0, 0.0]
        next_id += 1

    for _ in range(min(workers, len(queue))):
        start_worker()
    idle = deque(actors)
    while queue or busy:
        while queue and idle:
            wid = idle.popleft()
            job = queue.popleft()
            busy[actors[wid].score.remote(job)] = (wid, job)
        ready, _ = ray.wait(list(busy), num_returns=1)
        for future in ready:
            wid, job = busy.pop(future)
            try:
                result = ray.get(future)
            except ray.exceptions.RayTaskError as exc:  # an error in our code, not a dead worker: stop
                raise ScoreShardsError(f"worker {wid} failed on {job.path}: "
                                       f"{str(exc.cause) if exc.cause else exc}".splitlines()[0]) from None
            except ray.exceptions.RayActorError as exc:
                attempts[job.path] = attempts.get(job.path, 0) + 1
                log.error("worker %d died while scoring %s (%s); %s", wid, job.path, type(exc).__name__,
                          "retrying it on another worker" if attempts[job.path] < MAX_ATTEMPTS
                          else f"left out after {MAX_ATTEMPTS} attempts")
                actors.pop(wid)
                if attempts[job.path] < MAX_ATTEMPTS:
                    queue.appendleft(job)
                else:
                    summary.failed.append(job.path)
                if queue:
                    start_worker()
                    idle.append(next_id - 1)
                continue
            done(job, result)
            rates[wid][0] += result["images"]
            rates[wid][1] += result["seconds"]
            bar.set_postfix_str(", ".join(f"w{w} {n / s:.1f} img/s" for w, (n, s) in rates.items() if s > 0))
            idle.append(wid)
    for actor in actors.values():
        ray.kill(actor)
