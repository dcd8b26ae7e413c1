"""The TAPO objective against numbers computed by hand."""

import math

import pytest
import torch

from trainer.objective import (
    ObjectiveConfig,
    group_advantages,
    ood_suppressed,
    policy_loss,
    segment_masks,
)

LN = math.log


def test_grpo_and_decoupled_advantages():
    # group 0: on-policy [1, 0, 0, 1] and one augmented trajectory; group 1: all wrong (std 0:
    # advantage 0, never a division by zero)
    reward = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    group = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    aug = torch.tensor([False, False, False, False, True, False, False])
    a = group_advantages(reward, group, aug, dae=True, eps=0.0)
    s = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s, 0.5 / s, 0.0, 0.0]  # +-0.866
    assert a.tolist() == pytest.approx(expected, abs=1e-6)
    # without DAE the trajectory joins the group: mean 0.6, unbiased std sqrt(0.3)
    b = group_advantages(reward, group, aug, dae=False, eps=0.0)
    s5 = math.sqrt(0.3)
    assert b[:5].tolist() == pytest.approx([0.4 / s5, -0.6 / s5, -0.6 / s5, 0.4 / s5,
                                            0.4 / s5], abs=1e-6)
    assert b[0] < a[0]  # the inflated baseline pushes the group's correct rollouts down
    with pytest.raises(ValueError, match="no on-policy"):
        group_advantages(torch.tensor([1.0]), torch.tensor([3]), torch.tensor([True]))
    # algo.aug_weight scales the augmented trajectory's advantage only
    for weight in (0.3, 0.0):
        w = group_advantages(reward, group, aug, dae=True, eps=0.0, aug_weight=weight)
        assert w.tolist() == pytest.approx(expected[:4] + [0.5 / s * weight] + expected[5:],
                                           abs=1e-6)


def test_segment_masks():
    trained, corrective = segment_masks(
        prefix_len=torch.tensor([0, 2]), diagnosis_len=torch.tensor([0, 1]),
        correction_len=torch.tensor([3, 2]), augmented=torch.tensor([False, True]), width=6)
    assert trained.int().tolist() == [[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]
    assert corrective.int().tolist() == [[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]]


def test_ood_suppressed():
    old = torch.tensor([[LN(1e-4), LN(0.5), LN(1e-4)]])
    corrective = torch.tensor([[True, True, False]])
    assert ood_suppressed(old, corrective, 1e-3).tolist() == [[True, False, False]]


def _loss(lp, old, adv, trained=None, corrective=None, **cfg):
    lp, old = torch.tensor([lp]), torch.tensor([old])
    trained = torch.ones_like(lp, dtype=torch.bool) if trained is None else torch.tensor([trained])
    corrective = torch.zeros_like(trained) if corrective is None else torch.tensor([corrective])
    return policy_loss(lp, old, torch.tensor([adv]), trained, corrective,
                       ObjectiveConfig(**cfg))


def test_clipped_surrogate_by_hand():
    old = [LN(0.5), LN(0.5), LN(0.5)]
    lp = [LN(0.75), LN(0.45), LN(0.35)]  # ratios 1.5, 0.9, 0.7
    # A = +1: min(1.5, 1.28) = 1.28 (clipped); 0.9; min(0.7, 0.8) = 0.7
    out = _loss(lp, old, 1.0)
    assert out.loss.item() == pytest.approx(-(1.28 + 0.9 + 0.7) / 3)
    assert out.metrics["clip_fraction"] == pytest.approx(1 / 3)
    # A = -1: min(-1.5, -1.28) = -1.5; -0.9; min(-0.7, -0.8) = -0.8 (clipped)
    out = _loss(lp, old, -1.0)
    assert out.loss.item() == pytest.approx((1.5 + 0.9 + 0.8) / 3)
    assert out.metrics["clip_fraction"] == pytest.approx(1 / 3)


def test_clipped_tokens_have_no_gradient():
    lp = torch.tensor([[LN(0.75), LN(0.45)]], requires_grad=True)  # ratios 1.5 (clipped), 0.9
    old = torch.tensor([[LN(0.5), LN(0.5)]])
    mask = torch.ones_like(old, dtype=torch.bool)
    out = policy_loss(lp, old, torch.tensor([1.0]), mask, torch.zeros_like(mask),
                      ObjectiveConfig())
    out.loss.backward()
    assert lp.grad[0, 0] == 0 and lp.grad[0, 1] == pytest.approx(-0.9 / 2)


def test_ood_mask_and_capped_ratio_on_corrective_tokens():
    # token 0: rollout-like context (not trained); 1: corrective, pi_old 1e-4 (suppressed);
    # 2: corrective, ratio 1.5 capped at 1.28; 3: corrective, ratio 0.5: no lower clip
    old = [LN(0.5), LN(1e-4), LN(0.5), LN(0.5)]
    lp = [LN(0.5), LN(0.01), LN(0.75), LN(0.25)]
    trained = [False, True, True, True]
    corrective = [False, True, True, True]
    out = _loss(lp, old, 2.0, trained, corrective)
    assert out.loss.item() == pytest.approx(-(1.28 * 2 + 0.5 * 2) / 2)
    assert out.metrics["suppressed_share"] == pytest.approx(1 / 3)
    assert out.metrics["loss_tokens"] == 2
    off = _loss(lp, old, 2.0, trained, corrective, ood="off")  # plain clipped surrogate
    assert off.loss.item() == pytest.approx(-(1.28 * 2 + 1.28 * 2 + 0.5 * 2) / 3)
    assert off.metrics["suppressed_share"] == 0


def test_shaping_mode():
    out = _loss([LN(0.75)], [LN(0.5)], 1.0, [True], [True], ood="shaping", shaping_gamma=0.1)
    assert out.loss.item() == pytest.approx(-0.75 / 0.85)


def test_negative_samples_off_and_kl_and_normalizer():
    lp = torch.tensor([[LN(0.5)], [LN(0.5)]])
    old = torch.tensor([[LN(0.5)], [LN(0.5)]])
    mask = torch.ones_like(lp, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    both = policy_loss(lp, old, adv, mask, torch.zeros_like(mask), ObjectiveConfig())
    assert both.loss.item() == pytest.approx(0.0)
    pos = policy_loss(lp, old, adv, mask, torch.zeros_like(mask),
                      ObjectiveConfig(negative_samples=False))
    assert pos.loss.item() == pytest.approx(-1.0) and pos.metrics["loss_tokens"] == 1
    ref = torch.tensor([[LN(0.25)], [LN(0.25)]])  # k3: 0.5 - ln 0.5 - 1 = 0.1931
    kl = policy_loss(lp, old, adv, mask, torch.zeros_like(mask), ObjectiveConfig(kl_coef=0.1),
                     ref_logprobs=ref)
    assert kl.loss.item() == pytest.approx(0.1 * (0.5 + LN(2) - 1))
    far = torch.full_like(ref, LN(1e-6))  # k3 = 5e5 - ln 5e5 - 1: bounded at 10 (OpenRLHF's cap)
    capped = policy_loss(far, far, adv, mask, torch.zeros_like(mask),
                         ObjectiveConfig(kl_coef=0.1), ref_logprobs=torch.zeros_like(ref))
    assert capped.loss.item() == pytest.approx(0.1 * 10)
    half = policy_loss(lp, old, adv, mask, torch.zeros_like(mask),
                       ObjectiveConfig(negative_samples=False), normalizer=4)
    assert half.loss.item() == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(lp, old, adv, mask, torch.zeros_like(mask), ObjectiveConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="ood"):
        ObjectiveConfig(ood="sometimes")
