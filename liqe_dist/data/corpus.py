"""Packing an unlabelled image corpus (a folder tree, a list file or a glob) into shards for
scoring and gMAD mining: millions of files, no labels (none are invented), resumable.

The listing streams: a folder is walked one directory at a time in sorted order (only one
directory's entries are held), so the order is the same on every run and a rerun can skip what
a killed run already packed. A glob is sorted as a whole (that needs the full list); a list
file is read in its own order. Images are written in listing order (no shuffling: nothing is
trained on a corpus, so shards need not mix).

Each sample's JSON holds ``key``, ``dataset``, ``source`` (the path relative to the root, or the
list line), ``width``, ``height`` and ``content_hash``: BLAKE2b-128 of the decoded 8-bit RGB
pixels and the size, so a PNG and a BMP of the same picture are duplicates and a re-encoded
JPEG is not. Duplicates are reported in ``duplicates.tsv`` (and dropped with ``drop_duplicates``);
a file listed twice is always dropped. The first occurrence in listing order is the one kept.

Resuming: the set is built in ``.NAME.building`` beside its destination. After each shard is
closed, ``progress.json`` records how many listing entries that shard covers and the byte length
of the side files (rejects, duplicates, content hashes); a rerun with the same source and options
truncates the side files to those lengths, deletes any unfinished shard, and goes on from the
next entry, so the finished set equals an uninterrupted pack byte for byte (shards, rejects,
duplicates; the manifest differs only in its timings). The content hashes of every kept image
stay in memory for duplicate detection: about 200 bytes per image (2 GB for 10^7 images).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from liqe_dist.data.images import MAX_PIXELS, ImageDecodeError, decode_image, is_image_path, read_image_file
from liqe_dist.data.packing import (FORMAT, MANIFEST, REJECTS, PackingError, ShardSink, build_dir, check_set_dir,
                                    new_build_dir, recover_swap, set_lock, swap_in, unchanged_set)
from liqe_dist.data.parallel import ordered_map
from liqe_dist.data.records import labels_to_json, make_key
from liqe_dist.files import atomic_path
from liqe_dist.outputs import InputGuard, plain_name
from liqe_dist.tables import tsv_line

log = logging.getLogger(__name__)

DUPLICATES = "duplicates.tsv"
PROGRESS = "progress.json"
HASHES = "content_hashes.tsv"   # building folder only: key and hash of every image written
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass(frozen=True)
class CorpusConfig:
    """Shard limits (a shard closes at whichever comes first), duplicate policy, parallelism."""

    shard_max_bytes: int = 256 * 1024 * 1024
    shard_max_count: int = 2000
    drop_duplicates: bool = False
    workers: int = 2
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if self.shard_max_count < 1 or self.shard_max_bytes < 1:
            raise ValueError("pack folder: shard limits must be >= 1")
        if self.max_pixels < 1:
            raise ValueError(f"pack folder: max_pixels must be >= 1, got {self.max_pixels}")


@dataclass
class CorpusResult:
    out_dir: Path
    samples: int
    rejected: int
    duplicates: int   # found (kept or dropped, per the policy)
    dropped: int      # duplicates left out (and files listed twice)
    shards: int
    bytes: int
    skipped: bool     # an identical, complete pack was already there
    resumed_at: int   # listing entries skipped because a killed run had packed them
    restarted: bool = False  # a killed run's work was dropped: the source had changed since

    def summary(self, name: str) -> str:
        if self.skipped:
            return f"{name}: up to date ({self.samples} images in {self.shards} shards) at {self.out_dir}"
        resumed = f", resumed after {self.resumed_at} entries" if self.resumed_at else ""
        if self.restarted:
            resumed = ", started over (the source changed since the killed pack)"
        return (f"packed corpus {name}: {self.samples} images in {self.shards} shard(s) ({self.bytes / 1e6:.1f} MB), "
                f"{self.rejected} rejected, {self.duplicates} duplicate(s) ({self.dropped} dropped){resumed} "
                f"-> {self.out_dir}")


def walk_images(root: Path) -> Iterator[Path]:
    """Image files under ``root``, depth first in sorted order, holding one directory's entries
    per level of depth (an explicit stack: a tree thousands of folders deep is walked as any
    other). Symbolic links to folders are not followed (they can loop)."""
    stack: list[Iterator[os.DirEntry]] = []

    def enter(folder: str) -> None:
        try:
            stack.append(iter(sorted(os.scandir(folder), key=lambda e: e.name)))
        except OSError as exc:
            log.error("%s: cannot list (%s); skipped", folder, exc.strerror)

    enter(str(root))
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry.is_dir(follow_symlinks=False):
            enter(entry.path)
        elif is_image_path(Path(entry.name)):
            yield Path(entry.path)


def list_corpus(source: str | Path) -> Iterator[tuple[str, Path]]:
    """``(name, path)`` of every image of a corpus: a folder (walked, name = path relative to
    it), a list file (.txt/.lst/.list: one path per line, relative to the list's folder; name =
    the line) or a glob pattern (sorted; name = the matched path)."""
    path = Path(source)
    if path.is_dir():
        for p in walk_images(path):
            yield str(p.relative_to(path)), p
    elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        with open(path, "rb") as f:
            for raw in f:
                line = os.fsdecode(raw).strip()
                if line and not line.startswith("#"):
                    entry = Path(line)
                    yield line, entry if entry.is_absolute() else path.parent / entry
    elif glob.has_magic(str(source)):
        for match in sorted(glob.glob(str(source), recursive=True)):
            if is_image_path(Path(match)):
                yield match, Path(match)
    elif path.exists():
        raise ValueError(f"{path}: not a folder, a list file ({', '.join(LIST_SUFFIXES)}) or a glob pattern")
    else:
        raise FileNotFoundError(f"{path}: no such folder or list file")


def default_name(source: str | Path) -> str:
    """The set name a corpus gets without ``--name``: the resolved folder's name (``.`` is the
    current folder's), a list file's stem, or the name of a glob's fixed leading folder."""
    text = str(source)
    if glob.has_magic(text):
        fixed = []
        for part in Path(text).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        path = Path(*fixed) if fixed else Path(".")
    else:
        path = Path(text)
        if path.is_file():
            return path.stem
    name = path.resolve().name
    if not name:
        raise ValueError(f"{source}: no folder name to name the set after; give --name")
    return name


def corpus_key(name: str, relative: str) -> str:
    """A unique, readable shard key: the sanitised path plus 8 hex digits of the path's hash
    (sanitising can map two paths to one string: ``a.png``/``a.jpg``)."""
    digest = hashlib.blake2b(os.fsencode(relative), digest_size=4).hexdigest()
    return f"{make_key(name, relative)}_{digest}"


def inspect_image(args: tuple[str, int]) -> tuple[bytes | None, tuple[int, int] | None, str, str]:
    """A packing worker's job: ``(bytes, (width, height), content hash, "")`` for a good image,
    ``(None, None, "", reason)`` otherwise."""
    path, max_pixels = args
    try:
        data = read_image_file(path)
        img = decode_image(data, path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return None, None, "", exc.reason
    h = hashlib.blake2b(f"{img.width}x{img.height}:".encode(), digest_size=16)
    h.update(img.tobytes())
    return data, img.size, h.hexdigest(), ""


def _options_id(source: str, cfg: CorpusConfig) -> str:
    return hashlib.sha256(json.dumps({"source": source, "cfg": asdict(cfg)}, sort_keys=True).encode()).hexdigest()


def _truncate(path: Path, length: int, header: str) -> None:
    """Cut a side file back to ``length`` bytes (a new file gets ``header``)."""
    if length == 0:
        path.write_text(header)
        return
    with open(path, "r+b") as f:
        f.truncate(length)


def pack_corpus(source: str | Path, out_dir: Path, name: str, cfg: CorpusConfig = CorpusConfig(),
                progress: bool = True, force: bool = False) -> CorpusResult:
    """Pack the corpus ``source`` (see :func:`list_corpus`) as shard set ``out_dir``; resumes a
    killed pack of the same source, options and listing, rebuilds when they differ or with
    ``force``. ``out_dir`` must lie apart from the source and hold none of its images."""
    plain_name(name, "the set name")
    out_dir = Path(out_dir)
    magic = glob.has_magic(str(source))
    check_set_dir(out_dir, [] if magic else [source])
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    source_id = str(Path(source).resolve()) if not magic else str(source)
    options = _options_id(source_id, cfg)
    with set_lock(out_dir):
        recover_swap(out_dir)
        check_set_dir(out_dir)
        old = unchanged_set(out_dir, options) if not force else None
        if old is not None:
            return CorpusResult(out_dir, old["samples"], old["rejected"], old["duplicates"], old["dropped"],
                                len(old["shards"]), sum(s["bytes"] for s in old["shards"]), True, 0)
        build = build_dir(out_dir)
        state = _load_progress(build, options) if not force else None
        entries, listing, restarted = list_corpus(source), hashlib.sha256(), False
        if state is not None:
            listing = _listing_prefix(entries, state["consumed"])
            if listing.hexdigest() != state["listing"]:
                log.warning("%s changed since the killed pack (its first %d entries are not the files then "
                            "listed: added, removed or modified); starting over", source, state["consumed"])
                state, entries, listing, restarted = None, list_corpus(source), hashlib.sha256(), True
        if state is None:
            build = new_build_dir(out_dir)
        result = _pack(entries, listing, source, source_id, build, name, cfg, options, state, progress,
                       InputGuard(out_dir, "the shard set"))
        result.restarted = restarted
        swap_in(build, out_dir)
    result.out_dir = out_dir
    return result


def _load_progress(build: Path, options: str) -> dict | None:
    """What a killed pack of the same source and options finished, or None to start over."""
    try:
        state = json.loads((build / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("options") != options:
        log.info("%s: left by a pack of other inputs or options; starting over", build)
        return None
    if "listing" not in state:
        log.info("%s: left by an older version, which kept no fingerprint of the listing; starting over", build)
        return None
    return state


def _entry_digest(h, relative: str, stat: os.stat_result | None) -> None:
    """Fold one listing entry (name, size, modification time) into the listing's hash ``h``."""
    seen = f"{stat.st_size}:{stat.st_mtime_ns}" if stat is not None else "missing"
    h.update(os.fsencode(relative) + b"\0" + seen.encode() + b"\n")


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:
        return None


def _listing_prefix(entries: Iterator[tuple[str, Path]], count: int):
    """The hash of the first ``count`` entries of a listing (consumed from ``entries``)."""
    h = hashlib.sha256()
    for relative, path in islice(entries, count):
        _entry_digest(h, relative, _stat(str(path)))
    return h


def _pack(entries: Iterator[tuple[str, Path]], listing, source, source_id: str, build: Path, name: str,
          cfg: CorpusConfig, options: str, state: dict | None, progress: bool,
          guard: InputGuard) -> CorpusResult:
    """Pack the listing ``entries`` (past what ``state`` finished; ``listing``: the hash of the
    entries before them) into ``build``; ``guard`` refuses an entry inside the set's folder."""
    state = state or {"options": options, "consumed": 0, "listing": listing.hexdigest(), "samples": 0,
                      "rejected": 0, "duplicates": 0, "dropped": 0, "shards": [],
                      "offsets": {REJECTS: 0, DUPLICATES: 0, HASHES: 0}}
    kept = {s["name"] for s in state["shards"]}
    for p in build.iterdir():  # an unfinished shard of the killed run
        if p.name.endswith((".tar", ".partial")) and p.name not in kept:
            p.unlink()
    _truncate(build / REJECTS, state["offsets"][REJECTS], "source\tpath\treason\n")
    _truncate(build / DUPLICATES, state["offsets"][DUPLICATES], "source\tkey\tduplicate_of\n")
    _truncate(build / HASHES, state["offsets"][HASHES], "")
    seen: dict[str, str] = {}  # content hash -> key of its first occurrence
    with open(build / HASHES) as f:
        for line in f:
            key, digest = line.rstrip("\n").split("\t")
            seen.setdefault(digest, key)
    resumed_at = state["consumed"]
    if resumed_at:
        log.info("resuming %s after %d listed files (%d shards kept)", name, resumed_at, len(state["shards"]))

    counts = {k: state[k] for k in ("samples", "rejected", "duplicates", "dropped")}
    snapshot = dict(state, **counts)
    files = {n: open(build / n, "a", encoding="utf-8", errors="surrogateescape") for n in (REJECTS, DUPLICATES, HASHES)}

    def save_progress() -> None:  # a shard just closed: everything up to its last sample is final
        for f in files.values():
            f.flush()
        snapshot["shards"] = list(sink.shards)
        with atomic_path(build / PROGRESS) as tmp:
            tmp.write_text(json.dumps(snapshot))

    sink = ShardSink(build, name, cfg, shards=state["shards"], on_close=save_progress)
    pending: deque[tuple[str, str, os.stat_result | None]] = deque()  # the items in flight, in order

    def jobs():
        for relative, path in entries:
            guard(path)
            pending.append((relative, str(path), _stat(str(path))))
            yield str(path), cfg.max_pixels

    started = time.perf_counter()
    results = ordered_map(inspect_image, jobs(), cfg.workers)
    consumed = resumed_at
    try:
        for data, size, digest, reason in tqdm(results, unit="img", desc=f"packing {name}", disable=not progress,
                                               initial=resumed_at, smoothing=0.1):
            relative, path, stat = pending.popleft()
            consumed += 1
            _entry_digest(listing, relative, stat)
            if data is None:
                counts["rejected"] += 1
                files[REJECTS].write(tsv_line(relative, path, reason))
                log.warning("rejected %s: %s", path, reason)
                continue
            key = corpus_key(name, relative)
            first = seen.get(digest)
            if first is not None:
                twice = first == key
                counts["duplicates"] += not twice
                files[DUPLICATES].write(tsv_line(relative, key, first))
                if twice or cfg.drop_duplicates:
                    counts["dropped"] += 1
                    continue
            else:
                seen[digest] = key
            ext = Path(path).suffix.lower().lstrip(".") or "img"
            labels = {"key": key, "dataset": name, "source": relative, "width": size[0], "height": size[1],
                      "content_hash": digest}
            sink.write(key, ext, data, labels_to_json(labels))
            files[HASHES].write(f"{key}\t{digest}\n")
            counts["samples"] += 1
            for f in files.values():
                f.flush()
            snapshot.update(counts, consumed=consumed, listing=listing.hexdigest(),
                            offsets={n: os.path.getsize(build / n) for n in files})
    except BaseException:
        sink.abandon()
        raise
    finally:
        results.close()
    # entries after the last written sample (rejects, dropped duplicates) belong to no shard:
    # the final snapshot covers them before the last shard closes
    snapshot.update(counts, consumed=consumed, listing=listing.hexdigest(),
                    offsets={n: os.path.getsize(build / n) for n in files})
    shards = sink.finish()
    for f in files.values():
        f.close()
    if not counts["samples"]:
        raise PackingError(f"{name}: no image could be packed from {source} (see {build / REJECTS})")
    (build / HASHES).unlink()
    (build / PROGRESS).unlink()
    manifest = {
        "format": FORMAT, "kind": "corpus", "dataset": name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": {"format": "folder", "root": source_id}, "fingerprint": options, "pack": asdict(cfg),
        "samples": counts["samples"], "rejected": counts["rejected"], "rejects_file": REJECTS,
        "duplicates": counts["duplicates"], "dropped": counts["dropped"], "duplicates_file": DUPLICATES,
        "labels": {"mos": 0, "mos_std": 0, "scenes": 0, "distortion": 0, "reference": 0}, "mos_range": None,
        "splits": {"count": 0, "by": "none", "counts": []}, "shards": shards,
        "seconds": round(time.perf_counter() - started, 1),
    }
    with atomic_path(build / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return CorpusResult(build, counts["samples"], counts["rejected"], counts["duplicates"], counts["dropped"],
                        len(shards), sum(s["bytes"] for s in shards), False, resumed_at)
