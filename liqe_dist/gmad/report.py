"""What a gMAD search leaves for people: ``pairs.csv``, ``summary.csv``, ``skipped.csv``, an HTML
page with every pair side by side, one PNG contact sheet per (defender, attacker), and with
``--calibrate`` the fits in ``calibration.json``.

``pairs.csv`` per pair: ``level_centre`` and ``level_delta`` (the window's centre and half-width,
in the units the levels are formed on: the defender's raw scores, its ranks for quantile levels,
or calibration MOS with ``--calibrate``), ``level_images`` (N_jk: the defender's images in the
window before de-duplication or reuse removal; what the analysis weighs levels by),
``candidates`` (after them), ``rank_gap``, both images, and every model's score
(``best_<m>``/``worst_<m>``; with a calibration also ``best_<m>_mapped``, its value on the MOS
scale) and rank (of the scores the search used). ``skipped.csv`` gives ``level_images`` too:
analysis weights renormalise over the levels with answers.

In a pair, the left image is the attacker's best and the right its worst; both are shown in
boxes of one size (scaled to fit, aspect kept) with every model's score and the attacker's rank.
The summary gives, per (defender, attacker), the pairs found and the mean and smallest *rank gap*:
how far apart, in the attacker's ranking of the whole corpus (0..1), the two images of a level
are. A large gap means the attacker strongly separates images the defender calls equal; whether
the attacker is right is for the observers (``pairs.csv`` is their input).

Rules:
- ``--out`` is a folder this command owns (:func:`liqe_dist.outputs.claim_dir`): new, empty or
  marked by an earlier run; never the scores folder or a shard set, nor inside or around one.
- Before writing, what an earlier run wrote there is removed: ``images/``, ``sheets/`` and the
  files in :data:`WRITTEN_FILES`, those names only (a user's other files stay).
- Model names must be plain names: they name the sheets.
- Every text cell of the CSVs is escaped against formula injection (:mod:`liqe_dist.tables`):
  a key, source or model name starting with ``=``, ``+``, ``-``, ``@``, tab, CR or ``'`` gets a
  leading ``'``; numbers never. A reader undoes it with :func:`liqe_dist.tables.read_cell`.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from liqe_dist.gmad.scores import Corpus, check_model_names, extract_images, read_scores, shard_paths
from liqe_dist.gmad.search import LevelRule, SearchResult, search, sorted_ranks

if TYPE_CHECKING:
    from liqe_dist.gmad.calibrate import Calibration
from liqe_dist.outputs import OutputError, claim_dir, owned_by, remove_owned
from liqe_dist.provenance import write_config, write_run_record
from liqe_dist.tables import write_csv

log = logging.getLogger(__name__)

BOX = 320          # px: the side of the square each image is fitted into, on the page and the sheets
KIND = "gmad search"  # the owner mark of its output folders
WRITTEN_FILES = ("pairs.csv", "summary.csv", "skipped.csv", "index.html", "calibration.json")
WRITTEN_FOLDERS = ("images", "sheets")
SKIPPED_COLUMNS = ["defender", "attacker", "level", "reason", "level_images"]


def run_gmad(scores_dir: str | Path, models: list[str], rule: LevelRule, out_dir: str | Path,
             shards: list[str | Path] = (), calibrate: str | Path | None = None,
             device: str = "auto") -> tuple[SearchResult, dict[str, Path], str]:
    """The whole competition over a ``score-shards`` folder: read, calibrate (``calibrate``: a
    labelled shard set, :mod:`liqe_dist.gmad.calibrate`, scored on ``device``), search, write the
    report; returns the search result, the files written and the summary matrix as text."""
    corpus = read_scores(scores_dir, models)
    calibration = None
    if calibrate is not None:
        from liqe_dist.gmad.calibrate import calibrate as fit_models

        claim_out(out_dir, corpus, shards, [calibrate])  # before the models run: a refused --out costs nothing
        calibration = fit_models(calibrate, corpus.manifest, scores_dir, models, device)
    source = delta_source(rule, calibration)
    if calibration is not None and rule.levels_rule == "toolbox" and rule.delta is None:
        rule = dataclasses.replace(rule, delta=calibration.default_delta)
    log.info("searching %d images (%d unscored left out), %d ordered model pairs x %d levels", len(corpus.keys),
             corpus.dropped, len(models) * (len(models) - 1), rule.levels)
    result = search(corpus.scores, models, rule, corpus.hashes, calibration.maps if calibration else None)
    files = write_report(result, corpus, models, rule, out_dir, shards, calibration, source)
    write_config(out_dir, {"scores": str(Path(scores_dir).resolve()), "models": list(models),
                           "rule": dataclasses.asdict(rule), "level_rule": rule.levels_rule,
                           "levels_on": levels_on(rule, calibration),
                           "delta": {d: lv.delta for d, lv in result.levels.items()},
                           "delta_source": source,
                           "calibration": calibration.as_dict() if calibration else None,
                           "shards": [str(Path(s).resolve()) for s in shards]})
    write_run_record(out_dir, pairs=len(result.pairs))
    for s in result.skipped:
        log.warning("defender %s, attacker %s: level %d skipped (%s)", s.defender, s.attacker, s.level + 1, s.reason)
    return result, files, format_summary(summary_rows(result, models, rule), models)


def levels_on(rule: LevelRule, calibration: Calibration | None) -> str:
    """The units of the levels (``level_centre``, ``level_delta``, Δ)."""
    if rule.levels_rule == "quantile":
        return "the defender's ranks over the corpus (0..1)" + (", of its MOS-mapped scores" if calibration else "")
    if calibration:
        return f"MOS of the calibration set {calibration.dataset or calibration.shard_set} (scores mapped by its fits)"
    return "the defender's raw scores"


def delta_source(rule: LevelRule, calibration: Calibration | None = None) -> str:
    """Where Δ comes from, in words (``rule`` as given, before a calibration's default Δ is set)."""
    if rule.levels_rule != "toolbox":
        return f"--width {rule.width:g} x each defender's level spacing"
    if rule.delta is not None:
        return "--delta (absolute)"
    if calibration:
        return f"default: 9 x the calibration MOS span / 100 ({calibration.default_delta:g})"
    return "default: 0.09 x each defender's range (max - min)"


def corpus_ranks(corpus: Corpus, models: list[str], maps: dict | None = None) -> dict[str, np.ndarray]:
    """Each model's scaled rank (0 worst .. 1 best, ties share) of every image, of its scores as
    the search used them (through ``maps``, the calibration's, when given)."""
    out = {}
    for m in models:
        values = maps[m](corpus.scores[m]) if maps and m in maps else corpus.scores[m]
        order = np.argsort(values, kind="stable")
        ranks = np.empty(len(order))
        ranks[order] = sorted_ranks(values[order])
        out[m] = ranks
    return out


def pair_rows(result: SearchResult, corpus: Corpus, models: list[str], maps: dict | None = None) -> list[dict]:
    """One dict per pair: roles, level (centre and Δ in the units of the levels, N_jk), both
    images (key, source) and every model's score and rank (with ``maps``, the calibration's, also
    its mapped score ``{side}_{model}_mapped``; ranks are of the mapped scores)."""
    ranks = corpus_ranks(corpus, models, maps)
    mapped = {m: maps[m](corpus.scores[m]) for m in models} if maps else {}
    rows = []
    for i, p in enumerate(result.pairs):
        row = {"pair": i, "defender": p.defender, "attacker": p.attacker, "level": p.level,
               "level_centre": round(p.centre, 6), "level_delta": round(p.delta, 6),
               "level_images": p.level_images, "candidates": p.candidates, "rank_gap": round(p.gap, 6),
               "best_key": corpus.keys[p.best], "worst_key": corpus.keys[p.worst],
               "best_source": corpus.sources[p.best], "worst_source": corpus.sources[p.worst]}
        for side, idx in (("best", p.best), ("worst", p.worst)):
            for m in models:
                row[f"{side}_{m}"] = round(float(corpus.scores[m][idx]), 6)
                if mapped:
                    row[f"{side}_{m}_mapped"] = round(float(mapped[m][idx]), 6)
                row[f"{side}_{m}_rank"] = round(float(ranks[m][idx]), 6)
        rows.append(row)
    return rows


def summary_rows(result: SearchResult, models: list[str], rule: LevelRule) -> list[dict]:
    rows = []
    for d in models:
        for a in models:
            if a == d:
                continue
            gaps = [p.gap for p in result.pairs if (p.defender, p.attacker) == (d, a)]
            skipped = [s for s in result.skipped if (s.defender, s.attacker) == (d, a)]
            rows.append({"defender": d, "attacker": a, "pairs": len(gaps), "levels": rule.levels,
                         "skipped_levels": len(skipped),
                         "mean_rank_gap": round(float(np.mean(gaps)), 4) if gaps else float("nan"),
                         "min_rank_gap": round(float(np.min(gaps)), 4) if gaps else float("nan")})
    return rows


def format_summary(rows: list[dict], models: list[str]) -> str:
    """The mean rank gap as a matrix: rows defenders, columns attackers."""
    width = max(10, *(len(m) + 2 for m in models))
    lines = ["mean rank gap (attacker's ranking, 0..1) of each defender's level pairs; rows: defender, "
             "columns: attacker",
             "defender".ljust(width) + "".join(m.rjust(width) for m in models)]
    gap = {(r["defender"], r["attacker"]): r for r in rows}
    for d in models:
        cells = []
        for a in models:
            r = gap.get((d, a))
            cells.append("-".rjust(width) if r is None else f"{r['mean_rank_gap']:.3f} ({r['pairs']})".rjust(width))
        lines.append(d.ljust(width) + "".join(cells))
    return "\n".join(lines)


def claim_out(out_dir: str | Path, corpus: Corpus, shards: list[str | Path] = (),
              more: list[str | Path] = ()) -> Path:
    """``out_dir`` claimed for this command, apart from its inputs: the scores folder, the
    shard sets the images come from and ``more`` (the calibration set)."""
    inputs = [corpus.folder, *corpus.manifest.get("inputs", []), *shards, *more]
    return claim_dir(out_dir, KIND, [i for i in inputs if i is not None],
                     legacy=lambda p: all((p / f).is_file() for f in ("pairs.csv", "summary.csv", "index.html")))


def clear_previous(out: Path) -> None:
    """Remove what an earlier run of this command wrote into ``out`` (its names only), so no
    stale image or sheet sits beside the new pairs."""
    for name in WRITTEN_FOLDERS:
        remove_owned(out / name, lambda p: p.parent == out and owned_by(out, KIND))
    for name in WRITTEN_FILES:
        path = out / name
        if path.is_symlink() or path.is_file():
            path.unlink()  # a link itself, never what it points to
        elif path.exists():
            raise OutputError(f"{path}: not a file this command wrote; left as it is (move it away)")


def write_report(result: SearchResult, corpus: Corpus, models: list[str], rule: LevelRule, out_dir: str | Path,
                 shards: list[str | Path] = (), calibration: Calibration | None = None,
                 delta_note: str = "") -> dict[str, Path]:
    """Write pairs.csv, summary.csv, skipped.csv, images/, index.html and sheets/*.png (and
    calibration.json with a calibration) into ``out_dir`` (claimed for this command; an earlier
    run's outputs there removed first)."""
    check_model_names(models)
    rows = pair_rows(result, corpus, models, calibration.maps if calibration else None)
    summary = summary_rows(result, models, rule)
    paths = shard_paths(corpus.manifest, shards)
    out = claim_out(out_dir, corpus, shards, [calibration.shard_set] if calibration else [])
    clear_previous(out)
    write_csv(out / "pairs.csv", rows)
    write_csv(out / "summary.csv", summary)
    write_csv(out / "skipped.csv", [dict(zip(SKIPPED_COLUMNS, s)) for s in result.skipped], SKIPPED_COLUMNS)
    files = {}
    if calibration is not None:
        (out / "calibration.json").write_text(json.dumps(calibration.as_dict(), indent=1), encoding="utf-8")
        files["calibration"] = out / "calibration.json"
    names = pair_images(rows, corpus, paths, out / "images")
    page = out / "index.html"
    page.write_text(render_page(rows, summary, models, rule, names, corpus, result, calibration,
                                 delta_note or delta_source(rule, calibration)), encoding="utf-8")
    sheets = write_sheets(rows, models, names, out / "images", out / "sheets")
    return {"pairs": out / "pairs.csv", "summary": out / "summary.csv", "page": page, **files, **sheets}


def pair_images(rows: list[dict], corpus: Corpus, paths: dict[str, Path], folder: Path) -> dict[tuple[int, str], str]:
    """Every pair's two image files, ``folder/NNNNN_best.EXT`` and ``NNNNN_worst.EXT`` (what the study
    reads, by pair number); returns (pair, side) -> file name. Each image is read out of its shard
    once; an image in several pairs (levels reuse images by default) is copied to each."""
    first: dict[str, str] = {}
    for r in rows:
        for side in ("best", "worst"):
            first.setdefault(r[f"{side}_key"], f"{r['pair']:05d}_{side}")
    extracted = extract_images(first, corpus, paths, folder) if first else {}
    names = {}
    for r in rows:
        for side in ("best", "worst"):
            source = extracted[r[f"{side}_key"]]
            name = f"{r['pair']:05d}_{side}{Path(source).suffix}"
            if name != source:
                shutil.copyfile(folder / source, folder / name)
            names[r["pair"], side] = name
    return names


def _caption(row: dict, side: str, models: list[str]) -> str:
    parts = []
    for m in models:
        role = " (attacker)" if m == row["attacker"] else " (defender)" if m == row["defender"] else ""
        mapped = f" (MOS {row[f'{side}_{m}_mapped']:.3f})" if f"{side}_{m}_mapped" in row else ""
        parts.append(f"<b>{html.escape(m)}</b>{role}: {row[f'{side}_{m}']:.3f}{mapped} "
                     f"<span class=rank>rank {row[f'{side}_{m}_rank']:.2f}</span>")
    return "<br>".join(parts)


STYLE = f"""
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
table.summary td, table.summary th {{ padding: 0.2em 0.8em; text-align: right; }}
table.summary caption {{ caption-side: bottom; text-align: left; font-size: 0.85em; color: #555; }}
section {{ margin-top: 2em; }}
.pair {{ display: flex; gap: 1.5em; align-items: flex-start; margin: 1em 0; padding-bottom: 1em;
         border-bottom: 1px solid #ddd; }}
.level {{ width: 9em; font-size: 0.9em; }}
figure {{ margin: 0; width: {BOX}px; }}
figure img {{ width: {BOX}px; height: {BOX}px; object-fit: contain; background: #eee; display: block; }}
figcaption {{ font-size: 0.85em; margin-top: 0.3em; }}
.rank {{ color: #777; }}
"""

# Sets <body data-loaded="N"> once every image has loaded (N = images shown): a check for tests
# and for people on slow file systems.
SCRIPT = """
window.addEventListener('load', () => {
  const imgs = [...document.querySelectorAll('figure img')];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.loaded = ok;
  document.getElementById('status').textContent = ok + ' of ' + imgs.length + ' images loaded';
});
"""


def render_page(rows: list[dict], summary: list[dict], models: list[str], rule: LevelRule,
                names: dict[tuple[int, str], str], corpus: Corpus, result: SearchResult | None = None,
                calibration: Calibration | None = None, delta_note: str = "") -> str:
    """The HTML page: the summary matrix, then one section per (defender, attacker)."""
    e = html.escape
    head = "".join(f"<th>{e(m)}</th>" for m in models)
    gap = {(r["defender"], r["attacker"]): r for r in summary}
    body_rows = []
    for d in models:
        cells = "".join("<td>-</td>" if a == d else
                        f"<td>{gap[d, a]['mean_rank_gap']:.3f} ({gap[d, a]['pairs']} pairs)</td>" for a in models)
        body_rows.append(f"<tr><th>{e(d)}</th>{cells}</tr>")
    sections = []
    for d in models:
        for a in models:
            if a == d:
                continue
            items = []
            for r in (r for r in rows if (r["defender"], r["attacker"]) == (d, a)):
                items.append(
                    f"<div class=pair><div class=level>level {r['level'] + 1} of {rule.levels}<br>"
                    f"{e(d)} ≈ {r['level_centre']:.3f} ± {r['level_delta']:.3g}<br>"
                    f"{r['level_images']} images in the level, {r['candidates']} candidates<br>"
                    f"rank gap {r['rank_gap']:.3f}</div>"
                    f"<figure><img src='images/{e(names[r['pair'], 'best'])}' alt='{e(r['best_source'])}'>"
                    f"<figcaption>{e(a)}'s best: {e(r['best_source'])}<br>{_caption(r, 'best', models)}"
                    f"</figcaption></figure>"
                    f"<figure><img src='images/{e(names[r['pair'], 'worst'])}' alt='{e(r['worst_source'])}'>"
                    f"<figcaption>{e(a)}'s worst: {e(r['worst_source'])}<br>{_caption(r, 'worst', models)}"
                    f"</figcaption></figure></div>")
            sections.append(f"<section><h2>defender {e(d)}, attacker {e(a)}</h2>"
                            f"<p>{e(d)} scores the two images of each row alike; {e(a)} calls the left one its best "
                            f"and the right one its worst of the level.</p>{''.join(items) or '<p>no pairs</p>'}"
                            f"</section>")
    levels = f"level rule {rule.levels_rule}: {rule.describe()}; levels on {levels_on(rule, calibration)}"
    if result is not None and rule.levels_rule == "toolbox":
        levels += "; delta " + ", ".join(f"{d} {lv.delta:.4g}" for d, lv in result.levels.items())
        levels += f" ({delta_note or delta_source(rule, calibration)})"
    if calibration is not None:
        levels += (f"; scores mapped onto the MOS of {calibration.dataset or calibration.shard_set} "
                   f"({calibration.images} images) by each model's logistic fit (calibration.json)")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>gMAD: {e(', '.join(models))}</title>"
            f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body data-loaded=0>"
            f"<h1>gMAD competition: {e(', '.join(models))}</h1>"
            f"<p>{len(corpus.keys)} images searched ({corpus.dropped} left out: unscored); {e(levels)}; "
            f"{len(rows)} pairs. <span id=status></span></p>"
            f"<table class=summary><caption>mean rank gap of the pairs (attacker's ranking, 0..1; "
            f"rows: defender, columns: attacker)</caption><tr><th></th>{head}</tr>{''.join(body_rows)}</table>"
            f"{''.join(sections)}</body></html>")


def write_sheets(rows: list[dict], models: list[str], names: dict[tuple[int, str], str], images: Path,
                 out_dir: Path) -> dict[str, Path]:
    """One PNG per (defender, attacker): a row per level, the attacker's best left, worst right,
    each fitted into a BOX x BOX square, with the scores written under it."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    font = ImageFont.load_default(size=14)
    text_h = 18 * (len(models) + 1)
    margin = 12
    for d in models:
        for a in models:
            group = [r for r in rows if (r["defender"], r["attacker"]) == (d, a)]
            if a == d or not group:
                continue
            width = 2 * BOX + 3 * margin + 140
            height = 28 + len(group) * (BOX + text_h + margin) + margin
            sheet = Image.new("RGB", (width, height), "white")
            draw = ImageDraw.Draw(sheet)
            draw.text((margin, 8), f"defender {d} (rows: its levels), attacker {a}: best left, worst right",
                      fill="black", font=font)
            y = 28
            for r in group:
                draw.text((margin, y + 4), f"level {r['level'] + 1}\n{d} ~ {r['level_centre']:.3f}\n"
                                           f"gap {r['rank_gap']:.3f}", fill="black", font=font)
                for col, side in enumerate(("best", "worst")):
                    x = 140 + margin + col * (BOX + margin)
                    with Image.open(images / names[r["pair"], side]) as img:
                        tile = ImageOps.pad(img.convert("RGB"), (BOX, BOX), color=(238, 238, 238))
                    sheet.paste(tile, (x, y))
                    lines = [f"{a}'s {side}"] + [f"{m}: {r[f'{side}_{m}']:.3f} (rank {r[f'{side}_{m}_rank']:.2f})"
                                                 for m in models]
                    draw.text((x, y + BOX + 2), "\n".join(lines), fill="black", font=font)
                y += BOX + text_h + margin
            path = out_dir / f"{d}_vs_{a}.png"
            sheet.save(path)
            written[f"sheet {d} vs {a}"] = path
    return written
