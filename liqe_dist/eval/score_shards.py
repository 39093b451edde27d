"""Scoring packed shards with several models in one pass, one shard at a time, exactly once.

Work unit = one shard. Each image is decoded once, cropped once per distinct crop rule and
scored by every model (crops stay uint8 until the device normalises them). A shard's results go
to ``OUT/<shard>.parquet`` through a temporary file and a rename, so a file that exists is
complete; a shard whose file the manifest records (rules below) is skipped. A killed job rerun
therefore scores only what is missing, and every image appears exactly once in the union of the
files (at-least-once work, exactly-once results). An image that cannot be decoded gets a row
with its ``error`` and NaN scores, so the union still holds every key.

Columns: ``key, shard, source, width, height`` (the stored image's size, px), ``content_hash``
(for corpus shards; "" otherwise), ``error`` ("" when scored), then per model ``NAME`` (quality,
1-5) and, per head of its family, ``NAME_<head>`` (most likely label) and ``NAME_<head>_prob``.

``OUT/manifest.json`` names the models (checkpoint path and sha256, family, precision), the
shard sets and the counts; scoring into a folder written by other models is refused.

Rules:
- ``OUT`` is a folder this command owns (:func:`liqe_dist.outputs.claim_dir`): new, empty, marked
  by an earlier run, or holding a scores manifest (folders written before marking); never one
  that is, holds or lies inside a shard input.
- Model names are plain names (:func:`liqe_dist.outputs.plain_name`), a letter then letters,
  digits, ``_`` or ``-``; a model owns its name and every column ``NAME_...``, so no other model
  name and no base column may equal it or start with ``NAME_`` (``liqe`` and ``liqe_scene``
  collide).
- A part file ``OUT/<shard>.parquet`` counts as scored only when the manifest lists it (``parts``:
  name, rows, sha256, the model set's hash, duplicate keys) and the file still matches the
  record; any other is logged with the reason and scored again. The record is written (an
  atomic rewrite of the manifest) after the part's rename, so a kill in between costs one
  rescore, never a second copy of a key.
- Keys that appear more than once in one shard are counted per part (manifest, summary, log).
- ``check_job`` (``score-shards --check``) validates all of this from the weight files' headers
  and the shard manifests, without writing anything.

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
from liqe_dist.outputs import OutputError, check_claim, claim_dir, plain_name
from liqe_dist.provenance import write_config, write_run_record

log = logging.getLogger("liqe_dist.score_shards")

KIND = "score-shards"  # the owner mark of its output folders
MANIFEST = "manifest.json"
FORMAT = "liqe-dist/scores-1"
BASE_COLUMNS = ("key", "shard", "source", "width", "height", "content_hash", "error")
MAX_ATTEMPTS = 3
# Each finished part's record is appended to this journal at once (the manifest, rewritten once
# per part, would cost O(parts^2) bytes over a corpus of 10^5 shards); a run folds the journal
# into the manifest when it starts and when it ends. A line cut short by a kill is ignored (that
# part is scored again).
PARTS_JOURNAL = "parts.jsonl"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip format
PICKLE_PROTO = 0x80          # torch.save's legacy format starts with a pickle protocol opcode


class ScoreShardsError(ValueError):
    """The job cannot run as asked (bad model argument, foreign output folder, no shards)."""


def check_name(name: str) -> str:
    """``name`` when it can be a model's column name (see the module docstring); else ScoreShardsError."""
    try:
        plain_name(name, "the model name")
    except OutputError as exc:
        raise ScoreShardsError(str(exc)) from None
    if not _NAME.match(name) or name in BASE_COLUMNS:
        raise ScoreShardsError(f"the model name {name!r} must be a letter then letters, digits, _ or - "
                               f"(and not one of {', '.join(BASE_COLUMNS)})")
    return name


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model NAME=CHECKPOINT``; the name is checked when the spec is made."""

    name: str
    checkpoint: str

    def __post_init__(self) -> None:
        check_name(self.name)

    @staticmethod
    def parse(arg: str) -> "ModelSpec":
        name, sep, path = arg.partition("=")
        if not sep or not path:
            raise ScoreShardsError(f"--model {arg!r}: expected NAME=CHECKPOINT")
        try:
            spec = ModelSpec(name, path)
        except ScoreShardsError as exc:
            raise ScoreShardsError(f"--model {arg!r}: {exc}") from None
        if not Path(path).is_file():
            raise ScoreShardsError(f"--model {arg!r}: {path}: no such file")
        return spec


def check_models(models: list[ModelSpec]) -> None:
    """ScoreShardsError unless the models' names and the columns they own are all distinct: model
    M owns ``M`` and every ``M_...`` (its heads' columns, whatever its family's heads are)."""
    if not models:
        raise ScoreShardsError("give at least one --model NAME=CHECKPOINT")
    names = [check_name(m.name) for m in models]
    if len(set(names)) != len(names):
        raise ScoreShardsError(f"model names must differ, got {names}")
    for owner in names:
        prefix = owner + "_"
        for base in BASE_COLUMNS:
            if base.startswith(prefix):
                raise ScoreShardsError(f"model {owner!r}: its columns ({owner}_<head>...) would include the "
                                       f"column {base!r}; choose another name")
        for other in names:
            if other.startswith(prefix):
                raise ScoreShardsError(
                    f"models {other!r} and {owner!r} collide: {owner!r} writes the columns {owner} and "
                    f"{owner}_<head>[_prob], so {other!r} could overwrite one; rename one of them "
                    f"(e.g. {other.replace('_', '-')!r})")


def _check_torch_file(path: Path) -> None:
    """CheckpointError unless ``path`` opens like a torch.save file (zip with a data.pkl, or
    a legacy pickle), read from its first bytes and zip directory only."""
    import zipfile

    from liqe_dist.models.weights import CheckpointError

    with open(path, "rb") as f:
        head = f.read(4)
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as z:
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                    return
        except zipfile.BadZipFile:
            pass
        raise CheckpointError(f"{path}: a zip file without torch's data.pkl: not a weights file")
    if not head or head[0] != PICKLE_PROTO:
        raise CheckpointError(f"{path}: neither a safetensors nor a torch weights file")


def weights_family(path: str | Path) -> str:
    """The known family of the weight file ``path``, from its header alone (no tensors read);
    CheckpointError or ValueError naming the file otherwise."""
    from liqe_dist.models.registry import get_family
    from liqe_dist.models.weights import file_family, read_metadata

    meta = read_metadata(path)  # safetensors: the header; raises for a missing or unreadable file
    if Path(path).suffix != ".safetensors":
        _check_torch_file(Path(path))
    family = file_family(meta, path)
    get_family(family, f"{path}: family")
    return family


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
        from liqe_dist.hardware import precision_name, resolve_device, resolve_precision
        from liqe_dist.models.registry import load_model

        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, str(self.device))
        self.requested = precision
        self.names = [m.name for m in models]
        self.scorers = []
        for spec in models:
            model = load_model(spec.checkpoint, precision=self.precision, requested=self.requested)
            crops = default_crops(model, **({"eval_crops": eval_crops} if eval_crops else {}))
            scorer = Scorer(model, crops, batch_images=batch_images, device=self.device)
            # warm up on one full batch: LIQE encodes (and caches) its 495 prompts on first use, and
            # the first pass at a batch shape is slower (kernel selection, allocator)
            with torch.inference_mode():
                for _ in range(2):
                    scorer.predict(torch.zeros(scorer.batch_images, crops.eval_crops, 3, crops.size, crops.size,
                                               dtype=torch.uint8))
            self.scorers.append(scorer)
            log.info("scoring %s: %s", spec.name, scorer.describe())
        self.families = {n: s.model.family for n, s in zip(self.names, self.scorers)}
        # what the models compute in: one precision, or each model's when a family stays fp32 under auto
        used = {n: precision_name(s.model.dtype) for n, s in zip(self.names, self.scorers)}
        self.used_precision = (next(iter(used.values())) if len(set(used.values())) == 1
                               else ", ".join(f"{n}: {p}" for n, p in used.items()))
        self.batch_images = self.scorers[0].batch_images  # None: default_batch_images of the device
        self.decode_workers = decode_workers
        self._torch = torch

    def columns(self) -> dict[str, object]:
        """Column name -> the value of a row the models did not score."""
        cols: dict[str, object] = {"key": "", "shard": "", "source": "", "width": 0, "height": 0,
                                   "content_hash": "", "error": ""}
        owner = dict.fromkeys(cols, "a base column")
        for name, scorer in zip(self.names, self.scorers):
            own: dict[str, object] = {name: math.nan}
            for head in scorer.model.heads:
                own[f"{name}_{head}"], own[f"{name}_{head}_prob"] = "", math.nan
            for col in own:  # check_models rules this out; kept for a family with unusual head names
                if col in owner:
                    raise ScoreShardsError(f"model {name!r} and {owner[col]} both write the column {col!r}")
                owner[col] = f"model {name!r}"
            cols.update(own)
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
        """Score one shard into its parquet file (temp file + rename); returns counts (rows, errors,
        duplicate keys with the first few), the file's sha256 and timing."""
        import pyarrow.parquet as pq

        started = time.perf_counter()
        table = self.score_shard(job.path)
        with atomic_path(job.out) as tmp:
            pq.write_table(table, tmp)
            digest = file_sha256(tmp)
        errors = sum(1 for e in table.column("error").to_pylist() if e)
        repeated = duplicate_keys(table.column("key").to_pylist())
        return {"shard": job.path, "images": table.num_rows, "errors": errors, "sha256": digest,
                "duplicate_keys": len(repeated), "duplicates": repeated[:MAX_REPORTED],
                "seconds": time.perf_counter() - started, "precision": self.used_precision, "device": str(self.device)}


MAX_REPORTED = 5  # duplicate keys named per shard in the summary and the log


def duplicate_keys(keys: list[str]) -> list[tuple[str, int]]:
    """(key, count) of every key that appears more than once, in order of first appearance."""
    from collections import Counter

    return [(k, n) for k, n in Counter(keys).items() if n > 1]


@dataclass
class ScoreSummary:
    shards: int = 0          # scored now
    skipped: int = 0         # already scored by an earlier run
    images: int = 0          # scored now
    errors: int = 0          # images that could not be scored (rows with an error)
    busy_seconds: float = 0.0  # summed over workers: time spent scoring shards (start-up excluded)
    failed: list[str] = field(default_factory=list)   # shards left out after MAX_ATTEMPTS
    short: list[str] = field(default_factory=list)    # shards with fewer rows than their manifest says
    rescored: list[str] = field(default_factory=list)  # part files found but not trusted, and why
    duplicate_keys: int = 0  # keys that appear more than once within their shard (scored now)
    duplicates: list[str] = field(default_factory=list)  # the first few per shard: "shard: key 'k' appears n times"


def read_scores_manifest(path: Path) -> dict | None:
    """The scores manifest at ``path`` (a dict of this format), or None when it is missing or
    is something else."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def is_scores_folder(path: Path) -> bool:
    """Whether ``path`` holds a scores manifest: how folders written before owner marks are known."""
    return read_scores_manifest(Path(path) / MANIFEST) is not None


def _model_entries(models: list[ModelSpec], digests: dict[str, str]) -> dict[str, dict]:
    """The manifest's ``models``: checkpoint, sha256 and family of each (from the header only:
    the workers load the tensors)."""
    from liqe_dist.models.weights import file_family, read_metadata

    return {m.name: {"checkpoint": str(Path(m.checkpoint).resolve()), "sha256": digests[m.name],
                     "family": file_family(read_metadata(m.checkpoint), m.checkpoint)} for m in models}


def models_hash(entries: dict[str, dict], precision: str, eval_crops: int | None) -> str:
    """The model set's hash a part file is recorded with: each model's name and weights' sha256,
    and the precision and crops asked for (which change the scores too)."""
    key = {"models": {n: e["sha256"] for n, e in entries.items()}, "precision": precision, "eval_crops": eval_crops}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _refuse_other_setup(out_dir: Path, old: dict, models: dict[str, str | None], precision: str,
                        eval_crops: int | None) -> None:
    """ScoreShardsError when the manifest ``old`` was written for other models, precision or crops;
    ``models``: name -> the weights' sha256, or None to compare the name only."""
    recorded = old.get("models") if isinstance(old.get("models"), dict) else {}
    before = {n: e.get("sha256") if isinstance(e, dict) else None for n, e in recorded.items()}
    same = before.keys() == models.keys() and all(v is None or before[n] == v for n, v in models.items())
    if not same or old.get("precision_requested") != precision or old.get("eval_crops") != eval_crops:
        raise ScoreShardsError(f"{out_dir} holds scores of other models, precision or crops ({out_dir / MANIFEST}: "
                               f"{sorted(before)}, {old.get('precision_requested')}, eval_crops "
                               f"{old.get('eval_crops')}); score into another --out")


def _check_manifest(out_dir: Path, entries: dict[str, dict], precision: str, eval_crops: int | None,
                    sets: list[str], jobs: list[ShardJob]) -> dict:
    """Write the scores' manifest, or check that an existing one names the same models."""
    path = out_dir / MANIFEST
    if path.exists():
        old = read_scores_manifest(path)
        if old is None:
            raise ScoreShardsError(f"{path}: not a scores manifest (unreadable, or not a JSON object of format "
                                   f"{FORMAT}); score into another --out")
        _refuse_other_setup(out_dir, old, {n: e["sha256"] for n, e in entries.items()}, precision, eval_crops)
        if not isinstance(old.get("parts"), dict):
            old["parts"] = {}  # written before parts were recorded: every part file is scored again
        old["parts"].update(_journal_records(out_dir))
        return old
    manifest = {"format": FORMAT, "models": entries, "precision_requested": precision,
                "eval_crops": eval_crops,  # None: each family's own count (LIQE 15, PMT-IQA 4)
                "shard_sets": sets,
                "inputs": sorted({str(Path(j.path).resolve().parent) for j in jobs}
                                 | {str(Path(j.path).resolve()) for j in jobs if j.samples is None}),
                "shards": len(jobs), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "parts": {}}
    write_manifest(out_dir, manifest)
    return manifest


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Replace the manifest in one rename (a reader sees the old one or the new one); the parts
    journal it now holds goes."""
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    (out_dir / PARTS_JOURNAL).unlink(missing_ok=True)


def _journal_records(out_dir: Path) -> dict[str, dict]:
    """The part records a run appended to the journal (:data:`PARTS_JOURNAL`) and did not fold
    into the manifest (it was killed); a line that is not a whole record is left out."""
    records: dict[str, dict] = {}
    try:
        lines = (out_dir / PARTS_JOURNAL).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return records
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("record"), dict):
            records[entry["name"]] = entry["record"]
    return records


def distrust(job: ShardJob, record: object, setup: str) -> str:
    """Why the part file of ``job`` cannot count as scored ("" when it can): it must be listed in
    the manifest (``record``) with this model set, and its rows and sha256 must match."""
    import pyarrow.parquet as pq

    path = Path(job.out)
    if not isinstance(record, dict):
        return "the manifest does not list it"
    if record.get("models") != setup:
        return "the manifest lists it for another model set"
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except Exception as exc:  # pyarrow raises its own error types for a damaged file
        return f"not a readable parquet file ({type(exc).__name__})"
    if rows != record.get("rows"):
        return f"{rows} rows, the manifest says {record.get('rows')}"
    if file_sha256(path) != record.get("sha256"):
        return "its content differs from what was written"
    return ""


def _trusted_parts(jobs: list[ShardJob], parts: dict, setup: str, summary: ScoreSummary) -> set[str]:
    """The jobs whose part file counts as scored; a part file that does not is logged and its
    record dropped (it is scored again)."""
    done = set()
    for job in jobs:
        name = Path(job.out).name
        if not Path(job.out).exists():
            parts.pop(name, None)
            continue
        why = distrust(job, parts.get(name), setup)
        if not why:
            done.add(job.out)
            continue
        parts.pop(name, None)
        summary.rescored.append(f"{job.out}: {why}")
        log.warning("%s: found but not trusted (%s); scoring %s again", job.out, why, Path(job.path).name)
    return done


def _record_part(out_dir: Path, parts: dict, job: ShardJob, result: dict, setup: str) -> None:
    """Record a finished part (after its file's rename): in ``parts`` and, at once, the journal."""
    name = Path(job.out).name
    parts[name] = {"rows": result["images"], "sha256": result["sha256"], "models": setup,
                   "duplicate_keys": result["duplicate_keys"]}
    with open(out_dir / PARTS_JOURNAL, "a", encoding="utf-8") as f:
        f.write(json.dumps({"name": name, "record": parts[name]}) + "\n")


@dataclass(frozen=True)
class JobCheck:
    shards: int
    sets: list[str]
    families: dict[str, str]


def check_job(inputs: list[str | Path], models: list[ModelSpec], out_dir: str | Path, precision: str = "auto",
              eval_crops: int | None = None) -> JobCheck:
    """What ``score-shards --check`` validates before a job starts Ray: the model names, each
    weight file's header (readable, a known family), the shard inputs, and that ``out_dir`` would
    be accepted (and, when it holds scores, of the same models, precision and crops). Writes nothing."""
    check_models(models)
    families = {m.name: weights_family(m.checkpoint) for m in models}
    jobs, sets = find_shards(inputs, Path(out_dir))
    check_claim(out_dir, KIND, inputs, "--out", legacy=is_scores_folder)
    old = read_scores_manifest(Path(out_dir) / MANIFEST)
    if old is not None:  # names only: comparing the sha256 would read every weight file
        _refuse_other_setup(Path(out_dir), old, {m.name: None for m in models}, precision, eval_crops)
    return JobCheck(len(jobs), sets, families)


def score_shards(inputs: list[str | Path], models: list[ModelSpec], out_dir: str | Path, workers: int = 0,
                 address: str | None = None, precision: str = "auto", device: str = "auto",
                 batch_images: int | None = None, cpus_per_worker: float = 1.0, eval_crops: int | None = None,
                 decode_workers: int | None = None, progress: bool = True) -> ScoreSummary:
    """Score every shard of ``inputs`` that ``out_dir`` lacks (see the module docstring).
    ``decode_workers``: decoding processes per worker (None: on GPU workers ``cpus_per_worker``
    - 1, so the GPU does not wait for JPEG decoding; on the CPU none, the worker's CPUs compute)."""
    check_models(models)
    out_dir = Path(out_dir)
    jobs, sets = find_shards(inputs, out_dir)
    digests = {m.name: file_sha256(m.checkpoint) for m in models}
    entries = _model_entries(models, digests)
    claim_dir(out_dir, KIND, inputs, "--out", legacy=is_scores_folder)  # after every check: a refusal writes nothing
    manifest = _check_manifest(out_dir, entries, precision, eval_crops, sets, jobs)
    write_config(out_dir, {"inputs": [str(Path(i).resolve()) for i in inputs],
                           "models": {m.name: str(Path(m.checkpoint).resolve()) for m in models},
                           "precision": precision, "device": device, "batch_images": batch_images,
                           "eval_crops": eval_crops, "workers": workers, "cpus_per_worker": cpus_per_worker,
                           "decode_workers": decode_workers})
    setup = models_hash(entries, precision, eval_crops)
    parts = manifest["parts"]
    summary = ScoreSummary()
    trusted = _trusted_parts(jobs, parts, setup, summary)
    write_manifest(out_dir, manifest)  # the distrusted records are gone before anything is rescored
    todo = [j for j in jobs if j.out not in trusted]
    summary.skipped = len(jobs) - len(todo)
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
        summary.duplicate_keys += result["duplicate_keys"]
        for key, count in result["duplicates"]:
            summary.duplicates.append(f"{job.path}: key {key!r} appears {count} times")
        if result["duplicate_keys"]:
            log.warning("%s: %d key(s) appear more than once in the shard (first: %s); gmad search refuses "
                        "scores with duplicate keys", job.path, result["duplicate_keys"],
                        ", ".join(f"{k!r} x{n}" for k, n in result["duplicates"]))
        _record_part(out_dir, parts, job, result, setup)  # after the part's rename: a kill in between
                                                          # means one rescore
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
            "errors": summary.errors, "failed": summary.failed, "rescored": summary.rescored,
            "duplicate_keys": sum(r["duplicate_keys"] for r in runs),
            "precision": sorted({r["precision"] for r in runs}), "devices": sorted({r["device"] for r in runs})})
    manifest["complete"] = all(Path(j.out).name in parts and Path(j.out).exists() for j in jobs)
    write_manifest(out_dir, manifest)
    write_run_record(out_dir, precision=sorted({r["precision"] for r in runs}),
                     device=sorted({r["device"] for r in runs}), shards=summary.shards, images=summary.images)
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
