import itertools

import pytest

from liqe_dist.data.labels import DISTORTIONS, FINE_TO_COARSE, SCENES, coarse_distortion

from liqe_dist.models.liqe.vocabulary import QUALITIES, Vocabulary


def test_495_prompts_in_reference_order():
    v = Vocabulary()
    prompts = v.prompts()
    assert len(prompts) == 495 == v.size
    assert prompts[0] == "a photo of a animal with jpeg2000 compression artifacts, which is of bad quality"
    assert prompts[-1] == "a photo of a others with other artifacts, which is of perfect quality"
    # index = c*99 + s*11 + d, the order of itertools.product(qualities, scenes, distortions)
    for c, s, d in itertools.product(range(5), range(9), range(11)):
        i = c * 99 + s * 11 + d
        assert v.index(c, s, d) == i
        assert v.unindex(i) == (c, s, d)
        assert prompts[i] == (f"a photo of a {SCENES[s]} with {DISTORTIONS[d]} artifacts, "
                              f"which is of {QUALITIES[c]} quality")


def test_index_out_of_range_is_an_error():
    v = Vocabulary()
    with pytest.raises(IndexError):
        v.index(5, 0, 0)
    with pytest.raises(IndexError):
        v.unindex(495)


def test_reference_strings():
    assert QUALITIES == ("bad", "poor", "fair", "good", "perfect")
    assert SCENES[3] == "indoor" and SCENES[7] == "still_life" and SCENES[8] == "others"
    assert DISTORTIONS[8] == "spatial" and DISTORTIONS[10] == "other"


@pytest.mark.parametrize("fine", [
    # LIVE
    "jp2k", "jpeg", "wn", "gblur", "fastfading",
    # CSIQ
    "awgn", "jpeg 2000", "fnoise", "blur", "contrast",
    # TID2013: all 24
    "Additive Gaussian noise", "Additive noise in color components", "Spatially correlated noise",
    "Masked noise", "High frequency noise", "Impulse noise", "Quantization noise", "Gaussian blur",
    "Image denoising", "JPEG compression", "JPEG2000 compression", "JPEG transmission errors",
    "JPEG2000 transmission errors", "Non eccentricity pattern noise",
    "Local block-wise distortions of different intensity", "Mean shift", "Contrast change",
    "Change of color saturation", "Multiplicative Gaussian noise", "Comfort noise",
    "Lossy compression of noisy images", "Image color quantization with dither",
    "Chromatic aberrations", "Sparse sampling and reconstruction",
    # KADID-10k: all 25
    "gaussian blur", "lens blur", "motion blur", "color diffusion", "color shift",
    "color quantization", "color saturation 1", "color saturation 2", "jpeg2000", "jpeg",
    "white noise", "white noise in color component", "impulse noise", "multiplicative noise",
    "denoise", "brighten", "darken", "mean shift", "jitter", "non-eccentricity patch", "pixelate",
    "quantization", "color block", "high sharpen", "contrast change",
    # authentic
    "realistic blur", "realistic noise", "underexposure", "overexposure",
    "realistic contrast change", "other realistic",
])
def test_every_dataset_distortion_maps_to_a_coarse_class(fine):
    assert coarse_distortion(fine) in DISTORTIONS


def test_fine_map_follows_reference_choices():
    assert coarse_distortion("fastfading") == "jpeg2000 compression"
    assert coarse_distortion("brighten") == "overexposure"
    assert coarse_distortion("darken") == "underexposure"
    assert coarse_distortion("Motion_Blur") == "blur"
    assert coarse_distortion("pixelate") == "spatial"
    assert coarse_distortion("shifting the mean") == "other"
    assert set(FINE_TO_COARSE.values()) == set(DISTORTIONS)


def test_unknown_distortion_names_it():
    with pytest.raises(KeyError, match="warp drive"):
        coarse_distortion("warp drive")


def test_ablation_vocabularies():
    two = Vocabulary.for_tasks(levels=2)
    assert two.shape == (2, 9, 11) and two.prompts()[-1].endswith("which is of good quality")
    qd = Vocabulary.for_tasks(scene=False)
    assert qd.shape == (5, 1, 11) and len(qd.prompts()) == 55
    assert qd.prompts()[0] == "a photo with jpeg2000 compression artifacts, which is of bad quality"
    q = Vocabulary.for_tasks(scene=False, distortion=False)
    assert q.prompts() == [f"a photo with {c} quality" for c in QUALITIES]
    with pytest.raises(ValueError, match="5 or 2"):
        Vocabulary.for_tasks(levels=3)
    with pytest.raises(ValueError):
        Vocabulary((), (), ())
