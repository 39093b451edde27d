"""Datasets with synthetic distortions of reference images: LIVE, CSIQ, KADID-10k, TID2013, PIPAL.

Each is read as distributed; MOS keeps the dataset's scale with higher = better (LIVE and CSIQ
publish DMOS, flipped here as 100 - DMOS and 1 - DMOS). The reference-image id of every record
enables reference-wise splits.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Literal

from liqe_dist.data.records import Record, make_key
from liqe_dist.data.adapters._common import (DatasetFormatError, FileIndex, LeftOut, Records, column, load_mat,
                                             mat_numbers, mat_strings, read_table, read_text, require, to_float)

log = logging.getLogger(__name__)

LIVE_FOLDERS = ("jp2k", "jpeg", "wn", "gblur", "fastfading")  # the order of dmos.mat

LiveDmos = Literal["auto", "original", "realigned"]
#: LIVE's two label files and the DMOS variable in each (both hold ``orgs`` too, same order).
LIVE_LABEL_FILES = {"original": ("dmos.mat", "dmos"), "realigned": ("dmos_realigned.mat", "dmos_new")}


def live_label_file(root: Path, dmos: LiveDmos = "auto") -> tuple[str, Path, str]:
    """Which LIVE label file to read: (``original`` | ``realigned``, path, DMOS variable).
    ``auto`` takes dmos.mat when it is there (what packs always used), else dmos_realigned.mat."""
    if dmos not in ("auto", *LIVE_LABEL_FILES):
        raise ValueError(f"LIVE dmos must be auto, original or realigned, got {dmos!r}")
    if dmos == "auto":
        realigned_only = not (root / "dmos.mat").exists() and (root / "dmos_realigned.mat").exists()
        dmos = "realigned" if realigned_only else "original"
    name, var = LIVE_LABEL_FILES[dmos]
    if dmos == "realigned":
        require(root / name, "LIVE realigned DMOS, asked for with dmos=realigned / --live-dmos realigned")
    return dmos, root / name, var


def _live_counts(root: Path) -> list[int]:
    """Images img<k>.bmp in each LIVE distortion folder, in :data:`LIVE_FOLDERS` order."""
    counts = []
    for folder in LIVE_FOLDERS:
        require(root / folder, f"LIVE distortion folder {folder}")
        counts.append(len([p for p in (root / folder).iterdir() if re.fullmatch(r"img\d+\.bmp", p.name, re.I)]))
    return counts


def read_live(root: Path, dataset: str = "live", include_references: bool = False,
              dmos: LiveDmos = "auto") -> Records:
    """LIVE release 2: a DMOS file (dmos.mat: dmos, orgs; or dmos_realigned.mat: dmos_new, orgs,
    chosen by ``dmos``, see :func:`live_label_file`), refnames_all.mat, one folder per distortion.

    The 982 DMOS entries run over the folders in the order jp2k, jpeg, wn, gblur, fastfading,
    images img1.bmp..imgN.bmp in each. Entries with orgs = 1 are the undistorted references
    repeated in every folder; they are left out unless ``include_references``. With the realigned
    file, entries whose dmos_new is negative are left out too (the public PMT-IQA code skips them)
    and returned in ``left_out`` with the reason, so packing lists them in rejects.tsv.
    """
    kind, label_file, var = live_label_file(root, dmos)
    mat = load_mat(label_file, var, "orgs")
    values, orgs = mat_numbers(mat[var]), mat_numbers(mat["orgs"])
    refs = mat_strings(load_mat(root / "refnames_all.mat", "refnames_all")["refnames_all"])
    counts = _live_counts(root)
    if not (len(values) == len(orgs) == len(refs) == sum(counts)):
        raise DatasetFormatError(f"{label_file}: {len(values)} DMOS, {len(orgs)} orgs, {len(refs)} reference "
                                 f"names, but the folders hold {sum(counts)} images ({dict(zip(LIVE_FOLDERS, counts))})")
    log.info("LIVE labels: %s (%s, MOS = 100 - %s)", label_file, kind, var)
    out, left_out, i = [], [], 0
    for folder, n in zip(LIVE_FOLDERS, counts):
        for k in range(1, n + 1):
            rel, source = f"{folder}/img{k}.bmp", f"{label_file}[{i}]"
            if orgs[i] and not include_references:
                pass  # a reference repeated in this folder: not a distorted image
            elif kind == "realigned" and values[i] < 0:
                left_out.append(LeftOut(source, str(root / rel), f"negative {var} ({values[i]:g}): left out, as the "
                                                                 f"public PMT-IQA code skips these"))
            else:
                out.append(Record(key=make_key(dataset, rel), dataset=dataset, mos=100.0 - values[i],
                                  source=source, path=str(root / rel),
                                  distortion_fine="other" if orgs[i] else folder,
                                  reference=Path(refs[i]).stem))
            i += 1
    if left_out:
        log.warning("%s: left out %d image(s) whose %s is negative (a pack lists them in rejects.tsv)",
                    label_file, len(left_out), var)
    return Records(out, left_out, labels=label_file.name)


_CSIQ_FOLDERS = {"noise": "awgn", "awgn": "awgn", "jpeg": "jpeg", "jpeg 2000": "jpeg2000", "jpeg2000": "jpeg2000",
                 "f noise": "fnoise", "fnoise": "fnoise", "blur": "blur", "contrast": "contrast"}


def read_csiq(root: Path, dataset: str = "csiq", table: Path | None = None) -> list[Record]:
    """CSIQ: the DMOS table (csiq.DMOS.xlsx sheet 1, or a CSV of it: image, dst_type, dst_lev,
    dmos_std, dmos) and dst_imgs/<type>/<image>.<TYPE>.<level>.png."""
    table = table or next((p for p in (root / "csiq.DMOS.xlsx", root / "csiq.DMOS.csv", root / "csiq_dmos.csv")
                           if p.exists()), root / "csiq.DMOS.xlsx")
    files = FileIndex(root / "dst_imgs")
    by_parts = {}
    for p in files.root.rglob("*.png"):
        parts = p.name.split(".")
        if len(parts) == 4:
            by_parts[(parts[0].lower(), p.parent.name.lower(), parts[2])] = p
    out = []
    for i, row in enumerate(read_table(table), 2):
        where = f"{table}:{i}"
        image = column(row, table, "image").split(".")[0]
        dtype = column(row, table, "dst_type").lower().strip()
        if dtype not in _CSIQ_FOLDERS:
            raise DatasetFormatError(f"{where}: unknown CSIQ distortion type {dtype!r}")
        folder = _CSIQ_FOLDERS[dtype]
        level = str(int(float(column(row, table, "dst_lev"))))
        path = by_parts.get((image.lower(), folder, level))
        if path is None:
            raise DatasetFormatError(f"{where}: no image {image}.*.{level}.png under {files.root / folder}")
        std = row.get("dmos_std")
        out.append(Record(key=make_key(dataset, str(path.relative_to(root))), dataset=dataset,
                          mos=1.0 - to_float(column(row, table, "dmos"), table, where), source=where,
                          path=str(path), mos_std=to_float(std, table, where) if std else None,
                          distortion_fine=folder, reference=image))
    return out


KADID_TYPES = ("gaussian blur", "lens blur", "motion blur", "color diffusion", "color shift", "color quantization",
               "color saturation 1", "color saturation 2", "jpeg2000", "jpeg", "white noise",
               "white noise in color component", "impulse noise", "multiplicative noise", "denoise", "brighten",
               "darken", "mean shift", "jitter", "non-eccentricity patch", "pixelate", "quantization", "color block",
               "high sharpen", "contrast change")


def read_kadid(root: Path, dataset: str = "kadid10k") -> list[Record]:
    """KADID-10k: dmos.csv (dist_img, ref_img, dmos, var; dmos is higher-better, 1..5) and
    images/I<ref>_<type>_<level>.png."""
    table = root / "dmos.csv"
    files = FileIndex(root / "images")
    out = []
    for i, row in enumerate(read_table(table), 2):
        where = f"{table}:{i}"
        name = column(row, table, "dist_img")
        m = re.fullmatch(r"I(\d+)_(\d+)_(\d+)\.png", name, re.I)
        if not m or not 1 <= int(m.group(2)) <= len(KADID_TYPES):
            raise DatasetFormatError(f"{where}: {name!r} is not a KADID-10k image name (I01_01_01.png)")
        var = row.get("var")
        out.append(Record(key=make_key(dataset, name), dataset=dataset,
                          mos=to_float(column(row, table, "dmos"), table, where), source=where,
                          path=str(files.find(name, where)),
                          mos_std=math.sqrt(to_float(var, table, where)) if var else None,
                          distortion_fine=KADID_TYPES[int(m.group(2)) - 1],
                          reference=Path(column(row, table, "ref_img")).stem))
    return out


TID2013_TYPES = ("additive gaussian noise", "additive noise in color components", "spatially correlated noise",
                 "masked noise", "high frequency noise", "impulse noise", "quantization noise", "gaussian blur",
                 "image denoising", "jpeg compression", "jpeg2000 compression", "jpeg transmission errors",
                 "jpeg2000 transmission errors", "non eccentricity pattern noise",
                 "local block-wise distortions of different intensity", "mean shift", "contrast change",
                 "change of color saturation", "multiplicative gaussian noise", "comfort noise",
                 "lossy compression of noisy images", "image color quantization with dither",
                 "chromatic aberrations", "sparse sampling and reconstruction")


def read_tid2013(root: Path, dataset: str = "tid2013") -> list[Record]:
    """TID2013: mos_with_names.txt ("<MOS> <name>" per line, MOS 0..9 higher-better), optional
    mos_std.txt in the same order, distorted_images/i<ref>_<type>_<level>.bmp."""
    listing = require(root / "mos_with_names.txt", "TID2013 MOS list")
    std_file = root / "mos_std.txt"
    stds = [float(s) for s in read_text(std_file).split()] if std_file.exists() else None
    files = FileIndex(root / "distorted_images")
    out = []
    lines = [ln for ln in read_text(listing).splitlines() if ln.strip()]
    if stds is not None and len(stds) != len(lines):
        raise DatasetFormatError(f"{std_file}: {len(stds)} values for {len(lines)} images in {listing}")
    for i, line in enumerate(lines):
        where = f"{listing}:{i + 1}"
        parts = line.split()
        if len(parts) != 2:
            raise DatasetFormatError(f"{where}: expected '<MOS> <image name>', got {line!r}")
        m = re.fullmatch(r"i(\d+)_(\d+)_(\d+)\.bmp", parts[1], re.I)
        if not m or not 1 <= int(m.group(2)) <= len(TID2013_TYPES):
            raise DatasetFormatError(f"{where}: {parts[1]!r} is not a TID2013 image name (i01_01_1.bmp)")
        out.append(Record(key=make_key(dataset, parts[1].lower()), dataset=dataset,
                          mos=to_float(parts[0], listing, where), source=where, path=str(files.find(parts[1], where)),
                          mos_std=stds[i] if stds else None, distortion_fine=TID2013_TYPES[int(m.group(2)) - 1],
                          reference=f"i{int(m.group(1)):02d}"))
    return out


def read_pipal(root: Path, dataset: str = "pipal") -> list[Record]:
    """PIPAL (training part): Train_Label/*.txt with "<image>,<Elo score>" lines and the
    distorted images anywhere under the root. PIPAL's algorithm-made distortions (GAN, SR,
    denoising outputs) have no coarse class, so the distortion label stays missing; the type
    code is kept in ``extra``."""
    labels = require(root / "Train_Label", "PIPAL label folder")
    files = FileIndex(root)
    out = []
    for txt in sorted(labels.glob("*.txt")):
        for i, line in enumerate(read_text(txt).splitlines(), 1):
            if not line.strip():
                continue
            where = f"{txt}:{i}"
            name, _, score = line.partition(",")
            m = re.fullmatch(r"(A\d+)_(\d+)_(\d+)\.\w+", name.strip(), re.I)
            if not m:
                raise DatasetFormatError(f"{where}: {name!r} is not a PIPAL image name (A0001_00_00.bmp)")
            out.append(Record(key=make_key(dataset, name.strip()), dataset=dataset,
                              mos=to_float(score, txt, where), source=where, path=str(files.find(name.strip(), where)),
                              reference=m.group(1), extra={"pipal_type": f"{m.group(2)}_{m.group(3)}"}))
    if not out:
        raise DatasetFormatError(f"{labels}: no labels found")
    return out
