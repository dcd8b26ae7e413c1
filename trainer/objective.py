"""The TAPO objective as pure tensor functions (no model, no I/O), shared by the local trainer
and the OpenRLHF adapter. Our reading of the paper (../shared/PAPER.md) is in each docstring.

Shapes: B sequences, T response tokens (right-padded). Per sequence: `reward` (B,), `group`
(B,) integer group ids, `augmented` (B,) bool, and the token segments `prefix_len`,
`diagnosis_len`, `correction_len` (B,), whose sum is the response length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ObjectiveConfig:
    """The knobs of the loss; each ablation is one switch (DESIGN.md section 1)."""

    dae: bool = True  # off: augmented trajectories join their group's statistics
    aug_weight: float = 1.0  # scales the augmented trajectories' advantages (1: the paper's)
    ood: str = "mask"  # mask | shaping | off: OOD token suppression on corrective tokens
    ood_threshold: float = 1e-3  # mask: drop corrective tokens with pi_old(token) < this
    shaping_gamma: float = 0.1  # shaping: corrective tokens weighted by p / (p + gamma)
    negative_samples: bool = True  # off: rollouts with a negative advantage leave the loss
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_coef: float = 0.0  # k3 estimator against a reference policy; 0: no KL term
    eps: float = 1e-6

    def __post_init__(self):
        if self.ood not in ("mask", "shaping", "off"):
            raise ValueError(f"ood must be mask, shaping or off, not {self.ood!r}")


def group_advantages(reward: Tensor, group: Tensor, augmented: Tensor, dae: bool = True,
                     eps: float = 1e-6, aug_weight: float = 1.0) -> Tensor:
    """One advantage per sequence (B,).

    GRPO on the on-policy rollouts of each group g: `A_i = (r_i - mean_g) / (std_g + eps)`, with
    mean and (unbiased, as in OpenRLHF's group_norm) std over the group's G on-policy rollouts
    only. Decoupled advantage estimation: an augmented trajectory of group g is scored against
    the same on-policy statistics, `A_aug = (r_aug - mean_g) / (std_g + eps)`, and never changes
    them. A group whose basis rewards are all equal gets 0 everywhere. With `dae=False` (the
    ablation) the augmented trajectories join the group: mean and
    std over all G + 1 members, for every member. `aug_weight` then scales the augmented
    trajectories' advantages (a dose of the augmentation: 0 keeps them in the batch and the
    token mean but gives them no gradient).
    """
    adv = torch.zeros_like(reward, dtype=torch.float32)
    for g in torch.unique(group):
        members = group == g
        basis = members & ~augmented if dae else members
        r = reward[basis].float()
        if r.numel() == 0:
            raise ValueError(f"group {int(g)} has no on-policy rollouts to score against")
        std = r.std() if r.numel() > 1 else torch.tensor(0.0)
        if std > 0:  # a group whose rewards are all equal has nothing to compare: 0
            adv[members] = (reward[members].float() - r.mean()) / (std + eps)
    return torch.where(augmented, adv * aug_weight, adv)


def segment_masks(prefix_len: Tensor, diagnosis_len: Tensor, correction_len: Tensor,
                  augmented: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(trained, corrective), both (B, width) bool.

    `trained`: the tokens in the loss: every response token of a rollout; for an augmented
    trajectory the diagnosis and correction only. The wrong prefix is context (no loss): it is
    the model's own mistake and must not be reinforced by the trajectory's positive advantage.
    `corrective`: the diagnosis and correction tokens of augmented trajectories: the tokens not
    sampled from the policy, which OOD suppression looks at.
    """
    pos = torch.arange(width).unsqueeze(0)
    end = (prefix_len + diagnosis_len + correction_len).unsqueeze(1)
    start = prefix_len.unsqueeze(1)
    trained = (pos >= start) & (pos < end)
    corrective = trained & augmented.unsqueeze(1)
    return trained, corrective


def ood_suppressed(old_logprobs: Tensor, corrective: Tensor, threshold: float) -> Tensor:
    """(B, T) bool: corrective tokens the policy before the update finds out of distribution,
    `pi_old(token) < threshold`. They are dropped from the loss (PAPER.md, our reading)."""
    return corrective & (old_logprobs < torch.log(torch.tensor(threshold)))


def loss_mask(advantages: Tensor, trained: Tensor, corrective: Tensor, old_logprobs: Tensor,
              cfg: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    """(in_loss, suppressed), (B, T) bool: the trained tokens, less those of negative-advantage
    sequences when `negative_samples` is off, less the OOD-suppressed ones (`ood="mask"`)."""
    mask = trained.clone()
    if not cfg.negative_samples:
        mask &= (advantages >= 0).unsqueeze(1)
    suppressed = torch.zeros_like(mask)
    if cfg.ood == "mask":
        suppressed = ood_suppressed(old_logprobs, corrective, cfg.ood_threshold)
        mask &= ~suppressed
    return mask, suppressed


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float]


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, trained: Tensor,
                corrective: Tensor, cfg: ObjectiveConfig, ref_logprobs: Tensor | None = None,
                normalizer: float | None = None) -> LossOutput:
    """The token-level clipped surrogate, token-mean over the batch.

    - rollout tokens: `-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)`, r = pi / pi_old;
    - corrective tokens (`ood="mask"`): those with pi_old < ood_threshold leave the loss; the
      rest get `-min(r, 1 + clip_high) A`: the ratio capped above, without the lower clip;
    - corrective tokens (`ood="shaping"`, LUFFY-style): `-(p / (p + gamma)) A`, p = pi(token);
    - corrective tokens (`ood="off"`): treated like rollout tokens;
    - `negative_samples=False`: tokens of sequences with A < 0 leave the loss;
    - `kl_coef > 0`: plus kl_coef x the k3 estimate of KL(pi || pi_ref) on trained tokens, at
      most 10 a token (as OpenRLHF bounds it).

    `normalizer` is the number of loss tokens the mean divides by (default: those of this batch;
    the trainer passes the mini-batch's count when it accumulates micro-batches).
    Metrics: clip fraction (rollout tokens whose ratio was clipped), the share of corrective
    tokens suppressed, and the token count.
    """
    adv = advantages.unsqueeze(1).expand_as(logprobs)
    mask, suppressed = loss_mask(advantages, trained, corrective, old_logprobs, cfg)
    special = corrective if cfg.ood != "off" else torch.zeros_like(corrective)

    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - cfg.clip_low, 1 + cfg.clip_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    if cfg.ood == "mask":
        per_token = torch.where(special, -torch.clamp(ratio, max=1 + cfg.clip_high) * adv,
                                per_token)
    elif cfg.ood == "shaping":
        p = torch.exp(logprobs)
        per_token = torch.where(special, -(p / (p + cfg.shaping_gamma)) * adv, per_token)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        # k3, bounded as OpenRLHF bounds it (compute_approx_kl): the log-ratio at 10, the
        # value at 10 a token, so a policy far from its reference gets the same loss on both
        log_ratio = (ref_logprobs - logprobs).clamp(max=10)
        per_token = per_token + cfg.kl_coef * (torch.exp(log_ratio) - log_ratio - 1).clamp(max=10)

    n = float(mask.sum()) if normalizer is None else float(normalizer)
    loss = (per_token * mask).sum() / max(n, 1.0)
    rollout_tokens = mask & ~special
    was_clipped = (ratio * adv != torch.minimum(ratio * adv, clipped * adv)) & rollout_tokens
    n_corrective = int(corrective.sum())
    return LossOutput(loss, {
        "clip_fraction": float(was_clipped.sum()) / max(int(rollout_tokens.sum()), 1),
        "suppressed_share": float(suppressed.sum()) / max(n_corrective, 1),
        "loss_tokens": int(mask.sum()),
        "corrective_tokens": n_corrective,
    })
