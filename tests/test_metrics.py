import math

import numpy as np
import pytest

from liqe_dist.eval.metrics import by_dataset, correlation, logistic4, summarize_splits


def test_monotone_nonlinear_is_perfect():
    x = np.linspace(0, 1, 50)
    mos = logistic4(x, 90.0, 10.0, 0.5, 0.1)
    c = correlation(x, mos)
    assert c.srcc == pytest.approx(1.0) and c.krcc == pytest.approx(1.0)
    assert c.plcc > 0.9999 and c.rmse < 0.05 and c.note == ""
    # the raw linear correlation is clearly lower: the fit matters
    assert np.corrcoef(x, mos)[0, 1] < 0.98


def test_reversed_order():
    c = correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert c.srcc == pytest.approx(-1.0) and c.krcc == pytest.approx(-1.0)


def test_known_values_with_ties():
    pred = [1, 2, 3, 4, 5]
    mos = [5, 6, 7, 8, 7]
    # Spearman with ties = Pearson of average ranks: ranks of mos are [1, 2, 3.5, 5, 3.5]
    r_pred = np.array([1, 2, 3, 4, 5.0])
    r_mos = np.array([1, 2, 3.5, 5, 3.5])
    expected = np.corrcoef(r_pred, r_mos)[0, 1]
    assert correlation(pred, mos).srcc == pytest.approx(expected)
    # Kendall tau-b: concordant 8, discordant 1, one tie in mos: (8-1)/sqrt(10*9)
    assert correlation(pred, mos).krcc == pytest.approx(7 / math.sqrt(90))


def test_constant_predictions_reported_not_raised():
    c = correlation([3.0] * 10, np.arange(10.0))
    assert math.isnan(c.srcc) and math.isnan(c.plcc)
    assert "constant predictions" in c.note
    assert c.rmse == pytest.approx(np.std(np.arange(10.0)))


def test_fewer_points_than_fit_parameters():
    c = correlation([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert c.srcc == pytest.approx(0.5) and "too few for the 4-parameter fit" in c.note
    assert c.plcc == pytest.approx(np.corrcoef([1, 2, 3], [1, 3, 2])[0, 1])


def test_too_few_and_mismatched():
    assert "at least 3" in correlation([1, 2], [1, 2]).note
    with pytest.raises(ValueError, match="differ in length"):
        correlation([1, 2, 3], [1, 2])


def test_by_dataset_and_split_summary():
    pred = [1, 2, 3, 4, 1, 2, 3, 4]
    mos = [1, 2, 3, 4, 4, 3, 2, 1]
    res = by_dataset(pred, mos, ["a"] * 4 + ["b"] * 4)
    assert res["a"].srcc == pytest.approx(1) and res["b"].srcc == pytest.approx(-1)
    splits = [by_dataset([1, 2, 3, 4], m, ["a"] * 4) for m in ([1, 2, 3, 4], [1, 2, 4, 3], [2, 1, 3, 4])]
    s = summarize_splits(splits)["a"]["srcc"]
    assert s.median == pytest.approx(0.8) and s.n_splits == 3
    assert s.std == pytest.approx(np.std([1.0, 0.8, 0.8]))
