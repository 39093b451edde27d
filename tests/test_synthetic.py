import numpy as np
import pytest

from liqe_dist.data.synthetic import DISTORTIONS, LEVELS, REFERENCES, distort, pseudo_mos, reference_image
from liqe_dist.data.labels import DISTORTIONS as COARSE, SCENES


def test_every_coarse_class_is_synthesised():
    # "other" is the pristine reference itself
    assert set(DISTORTIONS) | {"other"} == set(COARSE)


def test_references_have_valid_scene_labels():
    assert len(REFERENCES) >= 9
    assert len({r.reference_id for r in REFERENCES}) == len(REFERENCES) - 1  # stereo pair grouped
    for ref in REFERENCES:
        assert 1 <= len(ref.scenes) <= 3 and set(ref.scenes) <= set(SCENES)


@pytest.mark.slow
@pytest.mark.parametrize("ref", list(REFERENCES), ids=lambda r: r.name)
def test_pseudo_mos_falls_with_level(ref):
    img = reference_image(ref)
    assert pseudo_mos(img, img) == pytest.approx(100.0)
    for name in DISTORTIONS:
        scores = [pseudo_mos(img, distort(img, name, lv, seed=lv)) for lv in range(1, LEVELS + 1)]
        assert all(a > b for a, b in zip(scores, scores[1:])), (name, scores)
        assert scores[0] < 100.0


def test_distortion_is_deterministic_and_validated():
    img = reference_image(REFERENCES[1], max_side=256)
    a = np.asarray(distort(img, "noise", 3, seed=7))
    b = np.asarray(distort(img, "noise", 3, seed=7))
    assert np.array_equal(a, b)
    with pytest.raises(KeyError, match="no synthesiser"):
        distort(img, "lens flare", 1)
    with pytest.raises(ValueError, match="level"):
        distort(img, "blur", 6)


@pytest.mark.slow
def test_written_dataset_reads_back_through_the_generic_adapter(tmp_path):
    from liqe_dist.data.adapters import read_dataset
    from liqe_dist.data.synthetic import write_synthetic_dataset

    table = write_synthetic_dataset(tmp_path / "syn", references=1, workers=1, progress=False)
    recs = read_dataset("csv", table, "synthetic")
    assert len(recs) == 1 + len(DISTORTIONS) * LEVELS
    assert {r.reference for r in recs} == {REFERENCES[0].reference_id}
    assert all(r.scenes == REFERENCES[0].scenes for r in recs)
    pristine = [r for r in recs if r.mos == 100.0]
    assert len(pristine) == 1 and pristine[0].distortion == "other"
    assert {r.distortion for r in recs} == set(COARSE)


def test_level_mos_is_the_mean_ssim_of_each_distortion_setting():
    from liqe_dist.data.synthetic import level_mos

    rows = [{"distortion": "blur", "level": "1", "ssim": "90"}, {"distortion": "blur", "level": "1", "ssim": "80"},
            {"distortion": "blur", "level": "2", "ssim": "70"}, {"distortion": "noise", "level": "1", "ssim": "60"},
            {"distortion": "other", "level": "0", "ssim": "100"}]
    level_mos(rows)
    assert [float(r["mos"]) for r in rows] == [85.0, 85.0, 70.0, 60.0, 100.0]
