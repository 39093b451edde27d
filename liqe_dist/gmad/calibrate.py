"""A common scale for the gMAD search (``gmad search --calibrate SHARDSET``), as the authors'
toolbox builds it (``initialization.m``: every model is computed on the 982 LIVE images and
``nlinfit(sobj, live_mos, 'logistic5', beta0)`` maps its scores onto LIVE MOS).

For each searched model: the calibration set (a labelled shard set, as ``liqe-dist pack`` writes
it; its ``mos`` labels on the dataset's own scale) is scored with the weights the scores folder
records for that model (``manifest.json`` ``models``: ``checkpoint``, ``sha256``), through the
project's evaluator (:func:`liqe_dist.eval.shard_eval.evaluate_shards`, every image of the set,
the scores' crops and precision rule); then the 4-parameter logistic

    f(s) = β2 + (β1 − β2) / (1 + exp(−(s − β3)/|β4|))

(:func:`liqe_dist.eval.metrics.logistic4`) is fitted to (score, MOS) by least squares
(``scipy.optimize.curve_fit``) from the toolbox's start β0 = [max(MOS), min(MOS), mean(score), 0.5].
The search then forms levels on f(y) of the defender and picks pairs on f(y) of the attacker.

Rules:
- A model the scores record without a checkpoint, a checkpoint that is gone, or one whose sha256
  differs from the recorded one (the scores came from other weights), is refused, naming it.
- An unlabelled set (a corpus), a set with fewer than 5 images with a MOS, a model that scores
  every calibration image alike, or a fit that fails or gives non-finite β, is an error naming
  the model.
- The fits go to ``calibration.json`` beside pairs.csv: per model β, β0, SROCC (of the raw
  scores) and PLCC (of f(score)) with the MOS, its checkpoint and sha256; the set's path, the
  sha256 of its manifest.json, its images and MOS range, the precision, crops and device.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liqe_dist.gmad.search import TOOLBOX_DELTA_MOS, GMADError

log = logging.getLogger(__name__)

#: Fewer images with a MOS than this: no 4-parameter fit.
MIN_IMAGES = 5


@dataclass(frozen=True)
class Logistic:
    """The toolbox's map of a model's scores onto MOS: f(s) = β2 + (β1 − β2)/(1 + exp(−(s − β3)/|β4|)),
    ``beta`` = (β1, β2, β3, β4)."""

    beta: tuple[float, float, float, float]

    def __call__(self, s: np.ndarray) -> np.ndarray:
        from liqe_dist.eval.metrics import logistic4

        return logistic4(np.asarray(s, dtype=np.float64), *self.beta)


@dataclass
class ModelFit:
    """One model's fit: the map, the start β0, and the agreement with MOS on the calibration set."""

    logistic: Logistic
    beta0: tuple[float, float, float, float]
    srocc: float
    plcc: float
    images: int
    checkpoint: str = ""
    sha256: str = ""

    def as_dict(self) -> dict:
        return {"beta": list(self.logistic.beta), "beta0": list(self.beta0), "srocc": self.srocc, "plcc": self.plcc,
                "images": self.images, "checkpoint": self.checkpoint, "sha256": self.sha256}


@dataclass
class Calibration:
    """The fits of every searched model on one calibration set."""

    shard_set: str
    manifest_sha256: str
    dataset: str
    images: int
    mos_min: float
    mos_max: float
    fits: dict[str, ModelFit] = field(default_factory=dict)
    precision: str = ""
    eval_crops: int | None = None
    device: str = ""

    @property
    def maps(self) -> dict[str, Logistic]:
        return {m: f.logistic for m, f in self.fits.items()}

    @property
    def default_delta(self) -> float:
        """The toolbox's Δ = 9 on a 0-100 MOS scale, in this set's MOS units: 9 × span / 100."""
        return TOOLBOX_DELTA_MOS * (self.mos_max - self.mos_min) / 100.0

    def as_dict(self) -> dict:
        return {"shard_set": self.shard_set, "manifest_sha256": self.manifest_sha256, "dataset": self.dataset,
                "images": self.images, "mos_range": [self.mos_min, self.mos_max],
                "default_delta": self.default_delta, "precision": self.precision, "eval_crops": self.eval_crops,
                "device": self.device,
                "map": "f(s) = b2 + (b1 - b2) / (1 + exp(-(s - b3) / |b4|)), beta = [b1, b2, b3, b4]",
                "models": {m: f.as_dict() for m, f in self.fits.items()}}


def fit_logistic_map(scores: np.ndarray, mos: np.ndarray, model: str) -> ModelFit:
    """The toolbox's logistic fit of ``scores`` onto ``mos`` (both (n,)), from
    β0 = [max(MOS), min(MOS), mean(score), 0.5]; GMADError naming ``model`` when it cannot be made."""
    from scipy import optimize, stats

    from liqe_dist.eval.metrics import logistic4

    scores, mos = np.asarray(scores, dtype=np.float64), np.asarray(mos, dtype=np.float64)
    if len(scores) < MIN_IMAGES:
        raise GMADError(f"--calibrate: model {model}: {len(scores)} calibration image(s) with a MOS, the "
                        f"4-parameter logistic needs at least {MIN_IMAGES}")
    if np.ptp(scores) == 0:
        raise GMADError(f"--calibrate: model {model} scores every calibration image alike ({scores[0]:g}): "
                        "no logistic fit onto MOS")
    if np.ptp(mos) == 0:
        raise GMADError(f"--calibrate: the calibration set's MOS is constant ({mos[0]:g}): nothing to map onto")
    beta0 = (float(mos.max()), float(mos.min()), float(scores.mean()), 0.5)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            beta, _ = optimize.curve_fit(logistic4, scores, mos, p0=beta0, maxfev=20000)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GMADError(f"--calibrate: the logistic fit of model {model} onto the calibration MOS failed "
                        f"({exc})") from None
    if not np.isfinite(beta).all():
        raise GMADError(f"--calibrate: the logistic fit of model {model} onto the calibration MOS gave "
                        f"non-finite parameters {beta.tolist()}")
    logistic = Logistic(tuple(float(b) for b in beta))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        srocc = float(stats.spearmanr(scores, mos)[0])
        mapped = logistic(scores)
        plcc = float(stats.pearsonr(mapped, mos)[0]) if np.ptp(mapped) > 0 else math.nan
    return ModelFit(logistic, beta0, srocc, plcc, len(scores))


def checkpoint_of(scores_manifest: dict, model: str, scores_dir: str | Path) -> tuple[Path, str]:
    """(the weight file, its recorded sha256) of ``model`` in the scores' manifest, checked
    against the file now; GMADError naming the model when it cannot be used."""
    from liqe_dist.eval.score_shards import file_sha256

    where = Path(scores_dir) / "manifest.json"
    entries = scores_manifest.get("models")
    entry = entries.get(model) if isinstance(entries, dict) else None
    if not isinstance(entry, dict) or not entry.get("checkpoint"):
        raise GMADError(f"--calibrate: model {model} has no checkpoint recorded in {where}: its scores cannot be "
                        "reproduced on the calibration set (score the corpus with `liqe-dist score-shards`)")
    path, recorded = Path(entry["checkpoint"]), entry.get("sha256")
    if not path.is_file():
        raise GMADError(f"--calibrate: model {model}'s checkpoint {path} (recorded in {where}) is missing")
    now = file_sha256(path)
    if not recorded or now != recorded:
        raise GMADError(f"--calibrate: model {model}'s checkpoint {path} no longer matches the scores (sha256 "
                        f"{str(recorded)[:12]}... recorded in {where}, {now[:12]}... now): the corpus was scored "
                        "with other weights; score it again")
    return path, now


def read_calibration_set(shard_set: str | Path) -> tuple[dict, str]:
    """(the labelled set's manifest, the sha256 of its manifest.json); GMADError for a corpus or
    anything that is not a packed set."""
    from liqe_dist.config import ConfigError
    from liqe_dist.data.packing import check_labelled_set, read_manifest
    from liqe_dist.eval.score_shards import file_sha256

    try:
        check_labelled_set(shard_set, "--calibrate")
    except ConfigError as exc:
        raise GMADError(str(exc)) from None
    return read_manifest(Path(shard_set)), file_sha256(Path(shard_set) / "manifest.json")


def calibrate(shard_set: str | Path, scores_manifest: dict, scores_dir: str | Path, models: list[str],
              device: str = "auto", batch_images: int = 8, workers: int = 0) -> Calibration:
    """Score the labelled ``shard_set`` with each of ``models``' recorded weights and fit each
    one's logistic onto its MOS (see the module docstring)."""
    from liqe_dist.eval.scoring import default_crops
    from liqe_dist.eval.shard_eval import evaluate_shards
    from liqe_dist.hardware import resolve_device, resolve_precision
    from liqe_dist.models.registry import load_model

    manifest, manifest_sha = read_calibration_set(shard_set)
    checkpoints = {m: checkpoint_of(scores_manifest, m, scores_dir) for m in models}  # every refusal first
    where = resolve_device(device)
    requested = str(scores_manifest.get("precision_requested") or "fp32")
    precision = resolve_precision(requested, str(where))
    eval_crops = scores_manifest.get("eval_crops")
    eval_crops = eval_crops if isinstance(eval_crops, int) and not isinstance(eval_crops, bool) else None
    calibration = None
    for m in models:
        path, sha = checkpoints[m]
        model = load_model(str(path), precision=precision, requested=requested)
        crops = default_crops(model, **({"eval_crops": eval_crops} if eval_crops else {}))
        log.info("calibrating %s on %s (%s, %d crops)", m, shard_set, precision, crops.eval_crops)
        [ev] = evaluate_shards(model, [shard_set], split=0, part="all", crops=crops, batch_images=batch_images,
                               workers=workers, progress=False, device=where).values()
        keys, score, mos = np.array(ev.keys, dtype=object), np.array(ev.score), np.array(ev.mos, dtype=np.float64)
        ok = np.isfinite(mos) & np.isfinite(score)
        order = np.argsort(keys[ok], kind="stable")  # key order: the fit does not depend on the shards' order
        score, mos = score[ok][order], mos[ok][order]
        if calibration is None:
            if len(mos) == 0:
                raise GMADError(f"--calibrate: {shard_set} has no image with a MOS")
            calibration = Calibration(str(Path(shard_set).resolve()), manifest_sha, str(manifest.get("dataset", "")),
                                      len(mos), float(mos.min()), float(mos.max()), precision=precision,
                                      eval_crops=crops.eval_crops if eval_crops else None, device=str(where))
        elif len(mos) != calibration.images:
            raise GMADError(f"--calibrate: model {m} scored {len(mos)} of the calibration images, the first "
                            f"model {calibration.images} (images that fail to decode for one model only?)")
        fit = fit_logistic_map(score, mos, m)
        fit.checkpoint, fit.sha256 = str(path.resolve()), sha
        calibration.fits[m] = fit
        log.info("calibration of %s: beta %s, SROCC %.3f, PLCC %.3f over %d images", m,
                 [round(b, 4) for b in fit.logistic.beta], fit.srocc, fit.plcc, fit.images)
    return calibration
