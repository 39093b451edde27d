"""Checking a packed shard set against its manifest, and summarising shard sets.

Rules (each problem names the shard, and the key where there is one):
- every shard's size, sha256 and sample count match the manifest, and the set's total;
- every sample has JSON labels naming its own key and exactly one image (decoded with ``decode``);
- a key appears once in the whole set: a second sample with a key, in its own shard or in
  another, is a problem (scores, evaluations and gMAD find images by key).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from liqe_dist.data.catalog import count_warning
from liqe_dist.data.images import ImageDecodeError, decode_image
from liqe_dist.data.packing import MANIFEST, read_manifest
from liqe_dist.data.stream import iter_shard


@dataclass
class VerifyReport:
    shard_dir: Path
    samples: int = 0
    problems: list[str] = field(default_factory=list)   # the set is damaged
    warnings: list[str] = field(default_factory=list)   # intact, but not what the catalog expects

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_shards(shard_dir: str | Path, decode: bool = True, progress: bool = True) -> VerifyReport:
    """Counts, sizes and sha256 of every shard against the manifest; with ``decode``, every
    image decoded and every label file parsed. Each problem names the shard (and key)."""
    shard_dir = Path(shard_dir)
    report = VerifyReport(shard_dir)
    try:
        manifest = read_manifest(shard_dir)
    except (FileNotFoundError, ValueError) as exc:
        report.problems.append(str(exc))
        return report
    seen: dict[str, str] = {}  # key -> the shard it was first found in
    for entry in tqdm(manifest["shards"], desc=f"verifying {manifest['dataset']}", unit="shard", disable=not progress):
        path = shard_dir / entry["name"]
        if not path.exists():
            report.problems.append(f"{path}: missing")
            continue
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            report.problems.append(f"{path}: {len(data)} bytes, manifest says {entry['bytes']}")
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            report.problems.append(f"{path}: sha256 differs from the manifest")
        count = 0
        for raw in iter_shard(path):
            count += 1
            where = f"{path}:{raw.key}"
            if raw.key in seen:
                other = seen[raw.key]
                again = "in the same shard" if other == entry["name"] else f"(the first is in {other})"
                report.problems.append(f"{where}: duplicate key {raw.key!r}: a second sample with it {again}")
            else:
                seen[raw.key] = entry["name"]
            try:
                labels = json.loads(raw.fields["json"])
            except (KeyError, ValueError):
                report.problems.append(f"{where}: labels missing or not JSON")
                continue
            if labels.get("key") != raw.key:
                report.problems.append(f"{where}: labels name key {labels.get('key')!r}")
            images = [k for k in raw.fields if k != "json"]
            if len(images) != 1:
                report.problems.append(f"{where}: expected one image, found {images}")
            elif decode:
                try:
                    decode_image(raw.fields[images[0]], where)
                except ImageDecodeError as exc:
                    report.problems.append(str(exc))
        if count != entry["samples"]:
            report.problems.append(f"{path}: {count} samples, manifest says {entry['samples']}")
        report.samples += count
    if report.samples != manifest["samples"]:
        report.problems.append(f"{shard_dir}: {report.samples} samples in shards, manifest says {manifest['samples']}")
    # entries the adapter left out on purpose (LIVE's negative realigned DMOS) belong to a complete set
    warning = count_warning(manifest["dataset"], manifest["samples"], int(manifest.get("left_out") or 0))
    if warning:
        report.warnings.append(warning)
    return report


def shards_info(root: str | Path) -> list[dict]:
    """One row per shard set under ``root`` (or ``root`` itself if it is one)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    dirs = [root] if (root / MANIFEST).exists() else sorted(p.parent for p in root.glob(f"*/{MANIFEST}"))
    rows = []
    for d in dirs:
        m = read_manifest(d)
        try:
            corpus = m.get("kind") == "corpus"  # unlabelled: no splits, no MOS
            first = {"train": "-", "val": "-", "test": "-"} if corpus else m["splits"]["counts"][0]
            row = {
                "dataset": m["dataset"], "samples": m["samples"], "rejected": m["rejected"],
                "shards": len(m["shards"]), "MB": round(sum(s["bytes"] for s in m["shards"]) / 1e6, 1),
                "splits": "none (corpus)" if corpus else f"{m['splits']['count']} by {m['splits']['by']}",
                "split 1 train/val/test": f"{first['train']}/{first['val']}/{first['test']}",
                "MOS range": "-" if corpus else f"{m['mos_range'][0]:.3g}..{m['mos_range'][1]:.3g}",
                "scenes": m["labels"]["scenes"], "distortion": m["labels"]["distortion"], "path": str(d),
            }
        except (KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"{d / MANIFEST}: malformed manifest (missing or wrong {exc})") from None
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no shard sets found)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols), "  ".join("-" * widths[c] for c in cols)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)
