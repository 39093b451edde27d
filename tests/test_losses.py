"""Losses against values computed by hand from eqs. 4-10."""

import math

import pytest
import torch

from liqe_dist.losses import (binary_fidelity, distortion_loss, quality_loss, scene_loss,
                              weighted_total)


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def fidelity(p: float, p_hat: float) -> float:
    return 1 - math.sqrt(p * p_hat) - math.sqrt((1 - p) * (1 - p_hat))


def test_one_pair_by_hand():
    # q_hat(x) - q_hat(y) = 1, x better: p = 1, p_hat = Phi(1/sqrt 2) = 0.760250, loss = 1 - sqrt(p_hat)
    term = quality_loss(torch.tensor([3.0, 2.0]), torch.tensor([70.0, 30.0]), torch.tensor([0, 0]))
    assert term.count == 2  # (x, y) and (y, x)
    assert term.mean.item() == pytest.approx(1 - math.sqrt(0.7602499389), abs=1e-6)
    assert term.mean.item() == pytest.approx(0.1280769, abs=1e-6)


def test_pairs_only_within_a_dataset():
    q = torch.tensor([3.0, 2.0, 2.5, 4.0, 1.5])
    mos = torch.tensor([80.0, 40.0, 60.0, 0.2, 0.9])  # datasets on different scales
    group = torch.tensor([0, 0, 0, 1, 1])
    expected, n = 0.0, 0
    for i in range(5):
        for j in range(5):
            if i != j and group[i] == group[j]:
                p = 1.0 if mos[i] >= mos[j] else 0.0
                expected += fidelity(p, phi((q[i] - q[j]).item() / math.sqrt(2)))
                n += 1
    term = quality_loss(q, mos, group)
    assert term.count == n == 3 * 2 + 2 * 1
    assert term.total.item() == pytest.approx(expected, abs=1e-6)


def test_ties_pull_scores_together():
    # equal MOS: p = 1 both ways (eq. 4); at equal scores p_hat = 1/2: loss 1 - sqrt(1/2) per pair
    term = quality_loss(torch.tensor([2.0, 2.0]), torch.tensor([50.0, 50.0]), torch.tensor([0, 0]))
    assert term.mean.item() == pytest.approx(1 - math.sqrt(0.5), abs=1e-6)
    q = torch.tensor([2.5, 2.0], requires_grad=True)
    quality_loss(q, torch.tensor([50.0, 50.0]), torch.tensor([0, 0])).mean.backward()
    assert q.grad[0] > 0 > q.grad[1]  # gradient descent moves them towards each other


def test_single_image_dataset_contributes_nothing():
    q = torch.tensor([3.0, 2.0, 4.0], requires_grad=True)
    term = quality_loss(q, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 1, 2]))
    assert term.count == 0 and term.total.item() == 0.0 and term.mean.item() == 0.0
    term.mean.backward()
    assert torch.equal(q.grad, torch.zeros(3))


def test_samples_without_mos_are_masked():
    q = torch.tensor([3.0, 2.0, 1.0])
    valid = torch.tensor([True, True, False])
    term = quality_loss(q, torch.tensor([2.0, 1.0, 0.0]), torch.tensor([0, 0, 0]), valid)
    assert term.count == 2
    assert term.mean.item() == pytest.approx(fidelity(1.0, phi(1 / math.sqrt(2))), abs=1e-6)


def test_scene_loss_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25, 0, 0, 0, 0, 0, 0],
                      [0.1] * 9])
    target = torch.zeros(2, 9)
    target[0, 0] = 1
    target[0, 1] = 1  # two scene labels
    mask = torch.tensor([True, False])  # second image has no scene labels
    term = scene_loss(p, target, mask)
    per = [fidelity(1, 0.5), fidelity(1, 0.25), fidelity(0, 0.25)] + [fidelity(0, 0.0)] * 6
    assert term.count == 1
    assert term.mean.item() == pytest.approx(sum(per) / 9, abs=1e-6)


def test_distortion_loss_by_hand():
    p = torch.tensor([[0.64, 0.36] + [0.0] * 9, [0.1] * 10 + [0.0]])
    term = distortion_loss(p, torch.tensor([0, -1]), torch.tensor([True, False]))
    assert term.count == 1
    assert term.mean.item() == pytest.approx(1 - 0.8, abs=1e-6)


def test_gradients_finite_at_exact_zeros():
    p = torch.tensor([[1.0, 0.0, 0.0]], requires_grad=True)
    loss = scene_loss(p, torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([True])).mean
    loss = loss + distortion_loss(p, torch.tensor([1]), torch.tensor([True])).mean
    loss.backward()
    assert torch.isfinite(p.grad).all()


def test_binary_fidelity_extremes():
    assert binary_fidelity(torch.tensor(1.0), torch.tensor(1.0)).item() == 0.0
    assert binary_fidelity(torch.tensor(1.0), torch.tensor(0.0)).item() == 1.0


def test_weighted_total_is_eq_10():
    q = quality_loss(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    d = distortion_loss(torch.tensor([[0.64, 0.36]]), torch.tensor([0]), torch.tensor([True]))
    total = weighted_total({"quality": q, "distortion": d}, {"quality": 0.5, "distortion": 2.0})
    assert total.item() == pytest.approx(0.5 * 0.1280769 + 2.0 * 0.2, abs=1e-6)
