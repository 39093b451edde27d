"""Packing labelled records into WebDataset tar shards with a manifest.

One sample per image: ``<key>.<ext>`` holds the original bytes (never re-encoded) and
``<key>.json`` the labels (including one split letter per split, so one packed copy serves all
ten splits). Every image is decoded once here to validate it and record its size; an image that
fails is written to ``rejects.tsv`` with its source and reason, and packing goes on. Entries the
adapter left out on purpose (``Records.left_out``, e.g. LIVE's negative realigned DMOS) are
listed there too, with their reason, and counted apart (``left_out`` in the manifest).

The manifest gives the observed ``mos_range`` and, for every numeric field of the records'
``extra`` labels (e.g. KonIQ's ``mos_zscore``), its observed ``extra_ranges`` [min, max], so a
training stream can scale such a label to [0, 1] as it does the MOS.

Records are written in a seeded random order (``PackConfig.order``), not in the adapter's: the
adapters list a synthetic dataset reference by reference, so shards written in that order would
each hold a few references, and a training batch drawn through a shard shuffle and a bounded
shuffle buffer would pair distorted versions of one photograph far more often than a uniform
shuffle does (on a KADID-like set: 21 % of pairs against 1.7 %; `bash launch/bench.sh mixing`).

A set is built in a folder beside its destination (``.NAME.building``) and swapped in when
complete, so an interrupted or failed rebuild (Ctrl-C, a full disk, SIGKILL) leaves the previous
set as it was; the manifest is written last. A lock file (``.NAME.lock``) keeps two packs out of
one set. Re-running with the same inputs and options (labels, image bytes of generated records,
size and modification time of image files) finds the manifest's fingerprint unchanged and does
nothing; otherwise the set is rebuilt.

What a pack may replace (``liqe_dist.outputs``): an existing ``OUT/NAME`` only when it is empty
or a shard set (its manifest says so), and only when it neither holds nor lies inside an input
(the dataset's folder or table, its lists, its image files); anything else is an error and
nothing is touched. The set name is one plain name. Keys never hold a dot whatever the name
(WebDataset splits a member name at its first dot), and every shard is read back through
WebDataset's own tar reader before it is kept, so a pack cannot report success on shards that
do not read as the samples written. The lock file goes when the pack ends.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Literal, Sequence

import webdataset as wds
from tqdm import tqdm
from webdataset.tariterators import group_by_keys, tar_file_iterator

from liqe_dist.config import ConfigError
from liqe_dist.data.images import MAX_PIXELS
from liqe_dist.files import atomic_path, partial_path
from liqe_dist.data.labels import VOCABULARY_VERSION
from liqe_dist.data.parallel import ordered_map
from liqe_dist.data.adapters._common import LeftOut
from liqe_dist.data.records import Record, labels_to_json
from liqe_dist.data.splits import assign_splits, split_summary
from liqe_dist.data.validate import validate_record
from liqe_dist.tables import tsv_line
from liqe_dist.outputs import OWNER_FILE, OutputError, check_apart, mark, owned_by, plain_name, remove_owned

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
REJECTS = "rejects.tsv"
FORMAT = "liqe-dist/shards-1"


@dataclass(frozen=True)
class PackConfig:
    """Shard limits (a shard closes at whichever comes first), split protocol, record order
    (``shuffled`` with ``order_seed``, or the adapter's ``source`` order), parallelism."""

    shard_max_bytes: int = 256 * 1024 * 1024
    shard_max_count: int = 2000
    splits: int = 10
    seed: int = 0
    order: Literal["shuffled", "source"] = "shuffled"
    order_seed: int = 0
    workers: int = 2
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ValueError(f"pack: max_pixels must be >= 1, got {self.max_pixels}")
        if self.order not in ("shuffled", "source"):
            raise ValueError(f"pack.order must be shuffled or source, got {self.order!r}")
        if self.shard_max_count < 1 or self.shard_max_bytes < 1:
            raise ValueError("pack: shard limits must be >= 1")
        if self.splits < 1:
            raise ValueError(f"pack.splits must be >= 1, got {self.splits}")


@dataclass
class PackResult:
    out_dir: Path
    samples: int
    rejected: int
    shards: int
    bytes: int
    skipped: bool  # True when an identical set was already packed
    left_out: int = 0  # entries the adapter left out on purpose (listed in rejects.tsv too)

    def summary(self, dataset: str) -> str:
        if self.skipped:
            return f"{dataset}: up to date ({self.samples} images in {self.shards} shards) at {self.out_dir}"
        left_out = f", {self.left_out} left out by the adapter" if self.left_out else ""
        return (f"packed {dataset}: {self.samples} images in {self.shards} shard(s) "
                f"({self.bytes / 1e6:.1f} MB), {self.rejected} rejected{left_out} -> {self.out_dir}")


def label_problem(rec: Record) -> str:
    """Why a record's labels cannot be packed ("" when they can): a MOS or MOS std that is not a
    finite number would poison every pair it is in."""
    for name, value in (("MOS", rec.mos), ("MOS std", rec.mos_std)):
        if value is not None and not math.isfinite(value):
            return f"{name} {value} is not a finite number"
    return ""


def extra_ranges(records: Iterable[Record]) -> dict[str, list[float]]:
    """[min, max] of every numeric field of the records' ``extra`` (ints and finite floats; not
    bools, which are flags), over the records that have it; fields in order of name."""
    ranges: dict[str, list[float]] = {}
    for rec in records:
        for name, value in rec.extra.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            lo_hi = ranges.setdefault(name, [value, value])
            lo_hi[0], lo_hi[1] = min(lo_hi[0], value), max(lo_hi[1], value)
    return dict(sorted(ranges.items()))


def _identity(r: Record) -> str:
    return r.path if r.path is not None else r.source


def unique_keys(records: list[Record]) -> None:
    """Make keys unique for distinct files: readable keys drop the extension and characters a
    key cannot hold, so ``a.png``/``a.jpg`` or ``café.png``/``cafe.png`` can meet; each record
    of such a group gets a short hash of its path. The same file listed twice is an error
    naming both sources."""
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.key, []).append(r)
    for key, group in groups.items():
        if len(group) == 1:
            continue
        seen: dict[str, str] = {}
        for r in group:
            if _identity(r) in seen:
                raise ValueError(f"duplicate entry {_identity(r)!r} (key {key!r}): {seen[_identity(r)]} and {r.source}")
            seen[_identity(r)] = r.source
        for r in group:
            r.key = f"{key}_{hashlib.sha1(os.fsencode(_identity(r))).hexdigest()[:8]}"
    taken = [r.key for r in records]
    if len(set(taken)) != len(taken):  # a hashed key met a readable one: vanishingly rare, but never silent
        raise ValueError("keys still collide after disambiguation; rename the files")


def _fingerprint(records: list[Record], cfg: PackConfig, left_out: Sequence[LeftOut] = ()) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(cfg), sort_keys=True).encode())
    if left_out:  # only then: the fingerprints of sets packed before left-out entries stay the same
        h.update(json.dumps([asdict(e) for e in left_out]).encode("utf-8", "surrogateescape"))
    for r in records:
        h.update(labels_to_json(r.labels()))
        if r.data is not None:
            h.update(hashlib.sha256(r.data).digest())
        else:  # size and modification time: an image re-saved at the same size is a change too
            try:
                st = os.stat(r.path)
                h.update(f"{r.path}:{st.st_size}:{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
            except OSError:
                h.update(f"{r.path}:missing".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class PackingError(ValueError):
    """Packing cannot go on (the set is being packed by another process, the disk is full);
    the previous set, if any, is left as it was."""


OWNER_KIND = "pack"  # the owner record of a folder a pack is building


def is_shard_set(path: Path) -> bool:
    """Whether ``path`` is a folder holding a shard set this project wrote (its manifest)."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_set_dir(out_dir: Path, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """OutputError unless packing may replace ``out_dir``: it is missing, empty or a shard set,
    and lies apart from every input (see the module docstring)."""
    check_apart(out_dir, inputs, "the shard set")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputError(f"{out_dir}: exists and is not a folder; nothing was changed")
    if out_dir.is_dir() and not is_shard_set(out_dir) and any(out_dir.iterdir()):
        raise OutputError(f"{out_dir}: exists and is not a shard set (no {MANIFEST} of {FORMAT}); it is left as it "
                          f"is: choose another --out or --name")


def _is_build(path: Path) -> bool:
    """A folder a pack was building: marked so (or, made by a version before marks, holding a
    corpus pack's progress file)."""
    return owned_by(path, OWNER_KIND) or (path / "progress.json").is_file()


def build_dir(out_dir: Path) -> Path:
    """Where the set ``out_dir`` is built before it is swapped in: ``.NAME.building`` beside it."""
    return out_dir.parent / f".{out_dir.name}.building"


def new_build_dir(out_dir: Path) -> Path:
    """An empty, marked :func:`build_dir` (one a killed pack left is removed: the lock says none
    is running, and its mark says it is a pack's)."""
    build = build_dir(out_dir)
    remove_owned(build, _is_build)
    build.mkdir()
    mark(build, OWNER_KIND)
    return build


@contextmanager
def set_lock(out_dir: Path):
    """Exclusive, non-blocking lock on a set's folder (released when the process ends, however);
    the lock file is removed when the block ends. A waiting process that locked a file already
    removed sees it is not the file at the path and tries again."""
    lock_path = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        f = open(lock_path, "a")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise PackingError(f"{out_dir}: another pack is writing this set (lock {lock_path})") from None
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        f.close()


def swap_in(build: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` (a shard set, or missing or empty) by ``build``: two renames,
    recoverable by :func:`recover_swap`."""
    old = out_dir.parent / f".{out_dir.name}.old"
    remove_owned(old, is_shard_set)
    check_set_dir(out_dir)  # again at the last moment: a pack can take hours, the folder can change
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(build, out_dir)
    (out_dir / OWNER_FILE).unlink(missing_ok=True)  # the manifest proves a set from here on
    if old.exists():
        if is_shard_set(old):
            shutil.rmtree(old)
        else:  # an empty folder the user made
            old.rmdir()


def recover_swap(out_dir: Path) -> None:
    """Finish what a swap interrupted between its renames left (the lock is held)."""
    old = out_dir.parent / f".{out_dir.name}.old"
    if old.is_dir() and is_shard_set(old):
        if out_dir.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, out_dir)


def unchanged_set(out_dir: Path, fingerprint: str) -> dict | None:
    """The manifest of the set at ``out_dir`` when it was packed from the same inputs and options
    (``fingerprint``) and all its shards are there; None when it must be (re)built."""
    if not is_shard_set(out_dir):
        return None
    old = json.loads((out_dir / MANIFEST).read_text())
    if old.get("fingerprint") == fingerprint and all((out_dir / s["name"]).exists() for s in old["shards"]):
        return old
    return None


def read_back(stream: BinaryIO, path: Path) -> list[str]:
    """The keys WebDataset's own tar reader finds in the shard ``stream`` (the file ``path``), in order."""
    return [s["__key__"] for s in group_by_keys(dict(e, __url__=str(path)) for e in tar_file_iterator(stream))]


class ShardSink:
    """Writes samples to numbered shards, each under a temporary name until it is closed.
    ``shards``: the closed shards' manifest entries (a resumed pack passes the ones it kept);
    ``on_close``: called after each shard is closed and renamed to its final name."""

    def __init__(self, out_dir: Path, dataset: str, cfg, shards: list[dict] | None = None,
                 on_close: Callable[[], None] | None = None):
        self.out_dir, self.dataset, self.cfg = out_dir, dataset, cfg
        self.shards: list[dict] = list(shards or [])
        self.on_close = on_close
        self._writer = None
        self._buf = None
        self._count = 0
        self._bytes = 0

    def write(self, key: str, ext: str, image: bytes, labels: bytes) -> None:
        if "." in key or "/" in key or not key:
            raise ValueError(f"shard key {key!r}: a key holds no dot or slash (WebDataset splits at the first dot)")
        size = len(image) + len(labels) + 2048  # two tar headers + padding
        if self._writer is not None and (self._count >= self.cfg.shard_max_count
                                         or self._bytes + size > self.cfg.shard_max_bytes):
            self._close()
        if self._writer is None:
            name = f"{self.dataset}-{len(self.shards):06d}.tar"
            self._path = self.out_dir / name
            self._partial = partial_path(self._path)
            self._file = open(self._partial, "wb")
            self._writer = wds.TarWriter(self._file, encoder=False, mtime=0)
            self._count = self._bytes = 0
            self._keys: list[str] = []
        self._writer.write({"__key__": key, ext: image, "json": labels})
        self._keys.append(key)
        self._count += 1
        self._bytes += size

    def _close(self) -> None:
        self._writer.close()
        self._file.close()
        data = self._partial.read_bytes()  # once: read back through WebDataset, and hashed
        try:
            found = read_back(io.BytesIO(data), self._partial)
        except (OSError, ValueError) as exc:  # what WebDataset raises on a tar it cannot group
            raise PackingError(f"{self._path}: WebDataset cannot read the shard just written ({exc}); nothing "
                               f"was replaced") from None
        if found != self._keys:
            raise PackingError(f"{self._path}: wrote {len(self._keys)} sample(s), WebDataset reads {len(found)} "
                               f"({', '.join(found[:3])}...); nothing was replaced")
        digest = hashlib.sha256(data).hexdigest()
        self._partial.replace(self._path)
        self.shards.append({"name": self._path.name, "samples": self._count,
                            "bytes": self._path.stat().st_size, "sha256": digest})
        self._writer = None
        if self.on_close is not None:
            self.on_close()

    def abandon(self) -> None:
        """Close the open shard's file without keeping it (an interrupted pack: its partial file
        is removed by whoever cleans the building folder)."""
        if self._writer is not None:
            self._writer.close()  # the tar stream first: it flushes into the file when collected
            self._file.close()
            self._writer = None

    def finish(self) -> list[dict]:
        if self._writer is not None:
            self._close()
        return self.shards


def pack_records(records: list[Record], out_dir: Path, dataset: str, source: dict,
                 cfg: PackConfig = PackConfig(), progress: bool = True, force: bool = False,
                 left_out: Sequence[LeftOut] | None = None) -> PackResult:
    """Validate, split and write ``records`` as a shard set in ``out_dir`` (which must stand
    apart from ``source``'s root and lists and hold none of the images). ``left_out``: entries
    the adapter left out, for rejects.tsv (default: the ``left_out`` of a :class:`Records`)."""
    plain_name(dataset, "the set name")
    left_out = list(getattr(records, "left_out", ()) if left_out is None else left_out)
    if not records:
        raise ValueError(f"{dataset}: no records to pack")
    out_dir = Path(out_dir)
    inputs = [source.get("root"), source.get("lists")] + [r.path for r in records if r.path is not None]
    check_set_dir(out_dir, inputs)
    unique_keys(records)
    split_info = assign_splits(records, count=cfg.splits, seed=cfg.seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(records, cfg, left_out)
    if cfg.order == "shuffled":
        records = list(records)
        random.Random(cfg.order_seed).shuffle(records)
    with set_lock(out_dir):
        recover_swap(out_dir)
        check_set_dir(out_dir)  # again under the lock: what is there now is what a swap replaces
        old = unchanged_set(out_dir, fingerprint) if not force else None
        if old is not None:
            return PackResult(out_dir, old["samples"], old["rejected"], len(old["shards"]),
                              sum(s["bytes"] for s in old["shards"]), skipped=True, left_out=old.get("left_out", 0))
        build = new_build_dir(out_dir)
        try:
            result = _write_set(records, build, dataset, source, cfg, split_info, fingerprint, progress, left_out)
            swap_in(build, out_dir)
        except BaseException as exc:
            shutil.rmtree(build, ignore_errors=True)  # made above, by this process
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise PackingError(f"{out_dir.parent}: no space left on device while packing {dataset}; "
                                   f"{out_dir} was left as it was") from None
            raise
    result.out_dir = out_dir
    return result


def _write_set(records: list[Record], out_dir: Path, dataset: str, source: dict, cfg: PackConfig,
               split_info: dict, fingerprint: str, progress: bool, left_out: Sequence[LeftOut] = ()) -> PackResult:
    """Validate and write every record into the (new, empty) folder ``out_dir``."""
    sink = ShardSink(out_dir, dataset, cfg)
    for e in left_out:
        log.info("left out %s (%s): %s", e.path, e.source, e.reason)
    rejects = []
    label_counts = {"mos": 0, "mos_std": 0, "scenes": 0, "distortion": 0, "reference": 0}
    written: list[Record] = []
    mos_values = []
    packable = []
    for rec in records:
        problem = label_problem(rec)
        if problem:
            rejects.append((rec.source, rec.path or "", problem))
            log.warning("rejected %s (%s): %s", rec.path or rec.key, rec.source, problem)
        else:
            packable.append(rec)
    records = packable
    jobs = ((r, cfg.max_pixels) for r in records)
    started = time.perf_counter()
    results = ordered_map(validate_record, jobs, cfg.workers)  # workers only run PIL decoders
    try:
        for rec, (data, size, reason) in tqdm(zip(records, results), total=len(records), unit="img",
                                              desc=f"packing {dataset}", disable=not progress):
            if data is None:
                rejects.append((rec.source, rec.path or "", reason))
                log.warning("rejected %s (%s): %s", rec.path or rec.key, rec.source, reason)
                continue
            labels = rec.labels()
            labels["width"], labels["height"] = size
            sink.write(rec.key, rec.ext, data, labels_to_json(labels))
            written.append(rec)
            mos_values.append(rec.mos)
            for name, has in (("mos", rec.mos is not None), ("mos_std", rec.mos_std is not None),
                              ("scenes", bool(rec.scenes)), ("distortion", rec.distortion is not None),
                              ("reference", rec.reference is not None)):
                label_counts[name] += has
    except BaseException:
        sink.abandon()
        raise
    finally:
        results.close()  # stops (kills) the workers when the loop ended early
    shards = sink.finish()
    with open(out_dir / REJECTS, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write("source\tpath\treason\n")
        for row in [(e.source, e.path, e.reason) for e in left_out] + rejects:
            f.write(tsv_line(*row))
    if not written:
        raise ValueError(f"{dataset}: every image was rejected (see {out_dir / REJECTS})")
    # recount over the images actually written (rejects left out)
    split_info = split_summary(written, by=split_info["by"], seed=split_info["seed"],
                               fractions=tuple(split_info["fractions"]) if split_info["fractions"] else None)
    manifest = {
        "format": FORMAT, "dataset": dataset, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "vocabulary_version": VOCABULARY_VERSION, "source": source, "fingerprint": fingerprint,
        "pack": asdict(cfg), "samples": len(written), "rejected": len(rejects), "left_out": len(left_out),
        "rejects_file": REJECTS, "labels": label_counts, "mos_range": [min(mos_values), max(mos_values)],
        "extra_ranges": extra_ranges(written),
        "splits": split_info, "shards": shards, "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return PackResult(out_dir, len(written), len(rejects), len(shards), sum(s["bytes"] for s in shards), False,
                      len(left_out))


def read_manifest(shard_dir: Path) -> dict:
    """The manifest of a packed set; a clear error when the set is incomplete or foreign."""
    path = Path(shard_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest (not a packed shard set, or packing did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        manifest = manifest if isinstance(manifest, dict) else {}
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_labelled_set(shards: str | Path, key: str) -> None:
    """``shards`` is a packed set with MOS labels, as training and cross-dataset scoring need;
    else a ConfigError naming ``key`` (an unlabelled corpus, from ``pack folder``, has none)."""
    try:
        manifest = read_manifest(Path(shards))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: {exc}") from None
    labels = manifest.get("labels")
    if manifest.get("kind") == "corpus" or (isinstance(labels, dict) and labels.get("mos") == 0):
        raise ConfigError(f"{key}: {shards} is an unlabelled corpus (no MOS): it can be scored (score-shards) "
                         f"but not trained or evaluated on; pack a labelled set (liqe-dist pack FORMAT ...)")
