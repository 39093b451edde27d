"""Losses against values computed by hand from eqs. 4-10."""

import math

import pytest
import torch

from liqe_dist.models.liqe.losses import LossConfig, binary_fidelity, distortion_loss, quality_loss, scene_loss
from liqe_dist.train.weighting import weighted_total


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


# -- the reference recipe, against the reference code's own formulas ------------------------------
# MNL_Loss.py of github zwx8981/LIQE, copied verbatim (less comments): the code behind Table 2.
_ESP = 1e-8


def ref_loss_m4(y_pred_all, per_num, y_all):
    loss = 0
    pos_idx = 0
    for task_num in per_num:
        y_pred = y_pred_all[pos_idx:pos_idx + task_num]
        y = y_all[pos_idx:pos_idx + task_num]
        pos_idx = pos_idx + task_num
        if y_pred.size(0) == 0:
            continue
        y_pred = y_pred.unsqueeze(1)
        y = y.unsqueeze(1)
        preds = y_pred - y_pred.t()
        gts = y - y.t()
        triu_indices = torch.triu_indices(y_pred.size(0), y_pred.size(0), offset=1)
        preds = preds[triu_indices[0], triu_indices[1]]
        gts = gts[triu_indices[0], triu_indices[1]]
        g = 0.5 * (torch.sign(gts) + 1)
        constant = torch.sqrt(torch.Tensor([2.])).to(preds.device)
        p = 0.5 * (1 + torch.erf(preds / constant))
        g = g.view(-1, 1)
        p = p.view(-1, 1)
        loss += torch.mean((1 - (torch.sqrt(p * g + _ESP) + torch.sqrt((1 - p) * (1 - g) + _ESP))))
    loss = loss / len(per_num)
    return loss


def ref_multi_fidelity(p, g):  # Multi_Fidelity_Loss (scenes)
    loss = 0
    for i in range(p.size(1)):
        p_i = p[:, i].view(-1, 1)
        g_i = g[:, i].view(-1, 1)
        loss = loss + 1 - (torch.sqrt(p_i * g_i + _ESP) + torch.sqrt((1 - p_i) * (1 - g_i) + _ESP))
    return torch.mean(loss / p.size(1))


def ref_fidelity_distortion(p, g):  # Fidelity_Loss_distortion
    loss = 0
    for i in range(p.size(1)):
        loss = loss + torch.sqrt(p[:, i].view(-1, 1) * g[:, i].view(-1, 1) + _ESP)
    return torch.mean(1 - loss)


REFERENCE = LossConfig("reference")


def test_recipes_resolve_every_knob_and_knobs_override():
    paper = LossConfig()
    assert (paper.phi_scale, paper.ties, paper.pair_normalisation, paper.fidelity_eps) == \
        (pytest.approx(math.sqrt(2)), "both_ways", "global", 0.0)
    assert (REFERENCE.phi_scale, REFERENCE.ties, REFERENCE.pair_normalisation, REFERENCE.fidelity_eps) == \
        (1.0, "half", "per_dataset", 1e-8)
    mixed = LossConfig("reference", pair_normalisation="global")
    assert mixed.pair_normalisation == "global" and mixed.ties == "half"
    with pytest.raises(ValueError, match="loss.phi_scale must be > 0"):
        LossConfig(phi_scale=0.0)
    with pytest.raises(ValueError, match="loss.recipe"):
        LossConfig("mine")


def test_reference_quality_loss_equals_loss_m4():
    # six datasets at the reference batch sizes, with ties inside datasets
    g = torch.Generator().manual_seed(3)
    sizes = [4, 4, 4, 4, 16, 16]
    score = 1 + 4 * torch.rand(sum(sizes), generator=g, dtype=torch.float64)
    mos = torch.randint(0, 6, (sum(sizes),), generator=g).double()  # few values: many ties
    group = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])
    expected = ref_loss_m4(score, sizes, mos)
    term = quality_loss(score, mos, group, cfg=REFERENCE)
    assert term.count == 6  # datasets, each weighing 1/6
    # rel 1e-7, not 1e-12: the reference divides by sqrt 2 held in a float32 tensor
    assert term.mean.item() == pytest.approx(expected.item(), rel=1e-7)
    # the gradient too: the reference recipe is the same function of the scores
    a = score.clone().requires_grad_(True)
    b = score.clone().requires_grad_(True)
    quality_loss(a, mos, group, cfg=REFERENCE).mean.backward()
    ref_loss_m4(b, sizes, mos).backward()
    assert torch.allclose(a.grad, b.grad, rtol=1e-6, atol=1e-12)


def test_reference_pair_by_hand():
    # one strict pair, d = 1: p_hat = Phi(1) = 0.841345 (no extra sqrt 2), loss = 1 - sqrt(p_hat + eps) - sqrt(eps)
    term = quality_loss(torch.tensor([3.0, 2.0], dtype=torch.float64), torch.tensor([70.0, 30.0]),
                        torch.tensor([0, 0]), cfg=REFERENCE)
    assert term.mean.item() == pytest.approx(1 - math.sqrt(0.8413447461 + 1e-8) - math.sqrt(1e-8), abs=1e-9)
    # a tie: target 1/2 (sign), loss at d = 1: 1 - sqrt(p_hat/2) - sqrt((1 - p_hat)/2), with eps
    tie = quality_loss(torch.tensor([3.0, 2.0], dtype=torch.float64), torch.tensor([50.0, 50.0]),
                       torch.tensor([0, 0]), cfg=REFERENCE)
    p = 0.8413447461
    assert tie.mean.item() == pytest.approx(1 - math.sqrt(p / 2 + 1e-8) - math.sqrt((1 - p) / 2 + 1e-8), abs=1e-9)


def test_each_knob_alone_by_hand():
    q = torch.tensor([3.0, 2.0, 2.5, 4.0, 1.5], dtype=torch.float64)
    mos = torch.tensor([80.0, 40.0, 80.0, 0.2, 0.9])  # a tie in dataset 0
    group = torch.tensor([0, 0, 0, 1, 1])

    def by_hand(scale, ties, per_dataset, eps):
        sums, counts = {}, {}
        for i in range(5):
            for j in range(5):
                if i == j or group[i] != group[j]:
                    continue
                if ties == "half":
                    p = 0.5 * (math.copysign(1, mos[i] - mos[j]) + 1) if mos[i] != mos[j] else 0.5
                else:
                    p = 1.0 if mos[i] >= mos[j] else 0.0
                ph = phi((q[i] - q[j]).item() / scale)
                f = 1 - math.sqrt(p * ph + eps) - math.sqrt((1 - p) * (1 - ph) + eps)
                k = int(group[i])
                sums[k], counts[k] = sums.get(k, 0) + f, counts.get(k, 0) + 1
        if per_dataset:
            return sum(sums[k] / counts[k] for k in sums) / len(sums)
        return sum(sums.values()) / sum(counts.values())

    for knobs in [dict(phi_scale=1.0), dict(ties="half"), dict(pair_normalisation="per_dataset"),
                  dict(fidelity_eps=1e-8), {}]:
        cfg = LossConfig("paper", **knobs)
        expected = by_hand(cfg.phi_scale, cfg.ties, cfg.pair_normalisation == "per_dataset", cfg.fidelity_eps)
        assert quality_loss(q, mos, group, cfg=cfg).mean.item() == pytest.approx(expected, abs=1e-12), knobs
    # the normalisations really differ here (3 pairs against 1), and so do the tie rules
    assert by_hand(math.sqrt(2), "both_ways", True, 0) != pytest.approx(by_hand(math.sqrt(2), "both_ways", False, 0))
    assert by_hand(math.sqrt(2), "half", False, 0) != pytest.approx(by_hand(math.sqrt(2), "both_ways", False, 0))


def test_reference_scene_and_distortion_losses_equal_the_reference_code():
    g = torch.Generator().manual_seed(1)
    p_scene = torch.softmax(torch.randn(6, 9, generator=g, dtype=torch.float64), dim=1)
    target = torch.zeros(6, 9, dtype=torch.float64)
    for i, labels in enumerate([[0], [2, 5], [8], [1, 3, 4], [7], [6]]):
        target[i, labels] = 1
    mask = torch.ones(6, dtype=torch.bool)
    got = scene_loss(p_scene, target, mask, eps=1e-8).mean
    assert got.item() == pytest.approx(ref_multi_fidelity(p_scene, target).item(), rel=1e-12)
    p_dist = torch.softmax(torch.randn(6, 11, generator=g, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 3, 10, 5, 5, 2])
    onehot = torch.nn.functional.one_hot(labels, 11).double()
    got = distortion_loss(p_dist, labels, mask, eps=1e-8).mean
    assert got.item() == pytest.approx(ref_fidelity_distortion(p_dist, onehot).item(), rel=1e-12)
    # and eps is what makes them differ from the paper's form: 11 square roots of 1e-8 per image
    paper = distortion_loss(p_dist, labels, mask).mean
    assert paper.item() - got.item() == pytest.approx(10 * 1e-4, rel=1e-3)


@pytest.mark.parametrize("recipe", ["paper", "reference"])
def test_samples_without_mos_are_masked_in_both_recipes(recipe):
    # a missing MOS travels as NaN: it must neither count nor turn the loss (or its gradient) into NaN
    q = torch.tensor([3.0, 2.0, 1.0], requires_grad=True)
    mos = torch.tensor([2.0, 1.0, float("nan")])
    cfg = LossConfig(recipe)
    term = quality_loss(q, mos, torch.tensor([0, 0, 0]), ~torch.isnan(mos), cfg)
    alone = quality_loss(q[:2], mos[:2], torch.tensor([0, 0]), cfg=cfg)
    assert term.mean.item() == pytest.approx(alone.mean.item(), abs=1e-7)
    term.mean.backward()
    assert torch.isfinite(q.grad).all() and q.grad[2] == 0
