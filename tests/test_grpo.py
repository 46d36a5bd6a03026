"""Tests for ``pte.training.grpo``: advantages by hand, the loss against TRL 1.16's own ``GRPOTrainer._compute_loss``,
and segment-wise / micro-batch accumulation and masking invariants."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from pte.training.grpo import (
    GRPOLossConfig,
    GRPOStats,
    group_advantages,
    grpo_loss,
    masked_mean,
    per_token_kl,
    per_token_objective,
    token_weights,
)

LENGTHS = [7, 3, 5, 1, 0, 6]  # variable lengths, a length-1 row and a fully padded row
T = 7
MAX_COMPLETION_LENGTH = 9  # larger than T, so dr_grpo's constant differs from the padded width


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random log-probs with ratios spread wide enough to hit both clip regions, and a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    b = len(LENGTHS)
    logprobs = -torch.rand(b, T, generator=g) * 3.0
    old = logprobs + 0.4 * torch.randn(b, T, generator=g)
    ref = logprobs + 0.5 * torch.randn(b, T, generator=g)
    advantages = torch.randn(b, generator=g)
    advantages[0], advantages[1] = 1.3, -0.7  # both signs for sure
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()
    return {"logprobs": logprobs, "old": old, "ref": ref, "advantages": advantages, "mask": mask}


class _Accelerator:
    """One process: gather/reduce are identities."""

    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_for_metrics(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def _trl_loss(batch: dict[str, torch.Tensor], cfg: GRPOLossConfig, on_policy: bool = False):
    """Run TRL's own ``GRPOTrainer._compute_loss`` on our tensors: an un-initialised trainer carrying exactly the
    attributes ``_compute_loss`` reads, with the policy forward replaced by our log-probs."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)  # skip __init__: no model, no data, no accelerate state
    trainer.loss_type = cfg.loss_type
    trainer.epsilon_low = cfg.epsilon
    trainer.epsilon_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon  # as TRL's __init__
    trainer.beta = cfg.beta
    trainer.importance_sampling_level = "token"
    trainer.max_completion_length = cfg.max_completion_length
    trainer.top_entropy_quantile = 1.0
    trainer.aux_loss_enabled = False
    trainer.off_policy_mask_threshold = None
    trainer.use_vllm = False
    trainer.vllm_importance_sampling_correction = False
    trainer._entropy_bonus_enabled = False
    trainer.current_gradient_accumulation_steps = 1
    trainer.model = SimpleNamespace(training=True)
    trainer.accelerator = _Accelerator()
    trainer.args = SimpleNamespace(
        delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl, steps_per_generation=1
    )
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    logprobs = batch["logprobs"].clone().requires_grad_(True)
    entropies = torch.ones_like(logprobs)
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logprobs, entropies, None)
    b = logprobs.size(0)
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, T, dtype=torch.long),
        "completion_mask": batch["mask"],
        "advantages": batch["advantages"],
        "old_per_token_logps": None if on_policy else batch["old"],
        "ref_per_token_logps": batch["ref"] if cfg.beta != 0.0 else None,
        "num_items_in_batch": batch["mask"].sum(),
    }
    loss = trainer._compute_loss(None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), logprobs.grad, metrics


def _ours(batch: dict[str, torch.Tensor], cfg: GRPOLossConfig, on_policy: bool = False):
    logprobs = batch["logprobs"].clone().requires_grad_(True)
    old = logprobs.detach() if on_policy else batch["old"]
    loss, stats = grpo_loss(logprobs, old, batch["ref"], batch["advantages"], batch["mask"], cfg)
    loss.backward()
    return loss.detach(), logprobs.grad, stats


# ---------------------------------------------------------------- advantages


def test_group_advantages_by_hand_population_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.7, 0.7, 0.7, 0.7])
    adv = group_advantages(rewards, group_size=4)
    # group 0: mean 0.5; deviations ±0.5; population var = 4 * 0.25 / 4 = 0.25 -> std 0.5 (unbiased would be 0.577)
    g0 = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4)
    # group 1: mean 0.25; deviations (-.25, -.25, .75, -.25); var = (3 * .0625 + .5625) / 4 = .1875 -> std .4330127
    g1 = torch.tensor([-0.25, -0.25, 0.75, -0.25]) / (math.sqrt(0.1875) + 1e-4)
    # group 2: all equal -> zero deviation, zero std -> zero advantage (not NaN); 0.7 is inexact, so allclose
    g2 = torch.zeros(4)
    torch.testing.assert_close(adv, torch.cat([g0, g1, g2]), atol=1e-6, rtol=0)
    assert torch.isfinite(adv).all()


def test_group_advantages_all_equal_group_is_exactly_zero() -> None:
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), group_size=3)
    assert torch.equal(adv, torch.zeros(6))


def test_group_advantages_scale_modes_by_hand() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # groups (1, 0) and (1, 1)
    # "none": only the group mean is removed: (0.5, -0.5, 0, 0)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))
    # "batch": group-mean baseline, std of all four rewards: mean .75, var = (3 * .0625 + .5625) / 4 = .1875
    batch_std = math.sqrt(0.1875)
    expected = torch.tensor([0.5, -0.5, 0.0, 0.0]) / (batch_std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 2, scale="batch"), expected)


def test_group_advantages_unbiased_matches_trl_std() -> None:
    """``unbiased=True`` reproduces TRL's advantage formula built from TRL's own ``nanstd`` (Bessel-corrected)."""
    g = torch.Generator().manual_seed(1)
    rewards = torch.randint(0, 2, (32,), generator=g).float()
    grouped_mean = rewards.view(-1, 8).mean(1).repeat_interleave(8)
    trl_group = (rewards - grouped_mean) / (nanstd(rewards.view(-1, 8), dim=1).repeat_interleave(8) + 1e-4)
    trl_batch = (rewards - grouped_mean) / (nanstd(rewards).expand_as(rewards) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 8, unbiased=True), trl_group)
    torch.testing.assert_close(group_advantages(rewards, 8, scale="batch", unbiased=True), trl_batch)
    # and the default (paper) differs from TRL exactly by the population/sample std factor sqrt((G-1)/G)
    nonzero = trl_group != 0
    assert not torch.allclose(group_advantages(rewards, 8)[nonzero], trl_group[nonzero])


def test_group_advantages_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), group_size=2, scale="rows")  # type: ignore[arg-type]


# ---------------------------------------------------------------- loss vs TRL

CASES = [
    pytest.param(loss_type, beta, eps_high, bias, id=f"{loss_type}-beta{beta}-epshi{eps_high}-biaskl{bias}")
    for loss_type in ("grpo", "dapo", "dr_grpo")
    for beta in (0.0, 0.04)
    for eps_high in (None, 0.28)
    for bias in ((True, False) if beta else (True,))
]


@pytest.mark.parametrize("loss_type,beta,eps_high,bias", CASES)
def test_loss_gradient_and_metrics_match_trl(loss_type: str, beta: float, eps_high: float | None, bias: bool) -> None:
    batch = _batch()
    cfg = GRPOLossConfig(
        loss_type=loss_type,  # type: ignore[arg-type]
        beta=beta,
        epsilon_high=eps_high,
        max_completion_length=MAX_COMPLETION_LENGTH,
        use_bias_correction_kl=bias,
    )
    trl_loss, trl_grad, trl_metrics = _trl_loss(batch, cfg)
    loss, grad, stats = _ours(batch, cfg)
    torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)

    ours = stats.as_dict()
    expected_keys = {"clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}
    expected_keys |= {"clip_ratio/low_min", "clip_ratio/high_max"} | ({"kl"} if beta else set())
    assert set(trl_metrics) - {"entropy"} == expected_keys
    for key in expected_keys:
        assert ours[key] == pytest.approx(trl_metrics[key], abs=1e-6), key
    assert ours["clip_ratio/low_mean"] > 0 and ours["clip_ratio/high_mean"] > 0  # the data exercise both clips


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_on_policy_and_delta_match_trl(loss_type: str) -> None:
    """Old log-probs = detached current ones (TRL's default when it skips them), and two-sided clipping (delta)."""
    batch = _batch(seed=3)
    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.01, max_completion_length=MAX_COMPLETION_LENGTH)  # type: ignore[arg-type]
    for kwargs, on_policy in ((dict(), True), (dict(delta=1.5), False)):
        cfg_i = GRPOLossConfig(**{**cfg.__dict__, **kwargs})
        trl_loss, trl_grad, _ = _trl_loss(batch, cfg_i, on_policy=on_policy)
        loss, grad, _ = _ours(batch, cfg_i, on_policy=on_policy)
        torch.testing.assert_close(loss, trl_loss, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, trl_grad, atol=1e-6, rtol=0)


def test_per_token_kl_is_k3() -> None:
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -0.5]])
    d = ref - logp  # (-0.5, 1.5)
    expected = torch.exp(d) - d - 1  # (e^-.5 + .5 - 1, e^1.5 - 2.5), both > 0
    torch.testing.assert_close(per_token_kl(logp, ref), expected)
    assert (per_token_kl(logp, ref) > 0).all() and per_token_kl(logp, logp).abs().max() == 0


# ---------------------------------------------------------------- accumulation and masking


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_chunked_segments_equal_full_loss_and_gradient(loss_type: str) -> None:
    batch = _batch(seed=5)
    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.02, epsilon_high=0.28, max_completion_length=MAX_COMPLETION_LENGTH)  # type: ignore[arg-type]
    full_loss, full_grad, full_stats = _ours(batch, cfg)

    logprobs = batch["logprobs"].clone().requires_grad_(True)
    weights = token_weights(batch["mask"], cfg.loss_type, cfg.max_completion_length)  # once, from the FULL mask
    total, stats = torch.zeros(()), None
    for cols in (slice(0, 2), slice(2, 5), slice(5, T)):  # segment boundaries, one backward each
        loss_k, stats_k = grpo_loss(
            logprobs[:, cols],
            batch["old"][:, cols],
            batch["ref"][:, cols],
            batch["advantages"],
            batch["mask"][:, cols],
            cfg,
            weights=weights[:, cols],
        )
        loss_k.backward()
        total = total + loss_k.detach()
        stats = stats_k if stats is None else stats + stats_k
    torch.testing.assert_close(total, full_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs.grad, full_grad, atol=1e-7, rtol=0)
    assert isinstance(stats, GRPOStats)
    for key, value in full_stats.as_dict().items():
        assert stats.as_dict()[key] == pytest.approx(value, abs=1e-7, nan_ok=True), key


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_row_micro_batches_with_batch_totals_equal_full(loss_type: str) -> None:
    batch = _batch(seed=7)
    cfg = GRPOLossConfig(loss_type=loss_type, max_completion_length=MAX_COMPLETION_LENGTH)  # type: ignore[arg-type]
    full_loss, full_grad, _ = _ours(batch, cfg)
    logprobs = batch["logprobs"].clone().requires_grad_(True)
    b, n_tok = len(LENGTHS), int(batch["mask"].sum())
    total = torch.zeros(())
    for rows in (slice(0, 3), slice(3, b)):
        m = batch["mask"][rows]
        w = token_weights(m, cfg.loss_type, cfg.max_completion_length, num_sequences=b, num_tokens=n_tok)
        loss_k, _ = grpo_loss(logprobs[rows], batch["old"][rows], None, batch["advantages"][rows], m, cfg, weights=w)
        loss_k.backward()
        total = total + loss_k.detach()
    torch.testing.assert_close(total, full_loss, atol=1e-6, rtol=0)
    torch.testing.assert_close(logprobs.grad, full_grad, atol=1e-7, rtol=0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_masked_tokens_get_exactly_zero_gradient_even_with_garbage_padding(loss_type: str) -> None:
    batch = _batch(seed=11)
    cfg = GRPOLossConfig(loss_type=loss_type, beta=0.1, max_completion_length=MAX_COMPLETION_LENGTH)  # type: ignore[arg-type]
    clean_loss, _, clean_stats = _ours(batch, cfg)
    pad = batch["mask"] == 0
    dirty = dict(batch)
    dirty["logprobs"] = batch["logprobs"].masked_fill(pad, 80.0)  # exp(80 - old) overflows fp32 if not guarded
    dirty["old"] = batch["old"].masked_fill(pad, float("-inf"))
    dirty["ref"] = batch["ref"].masked_fill(pad, float("nan"))
    loss, grad, stats = _ours(dirty, cfg)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(grad[pad], torch.zeros(int(pad.sum())))
    assert (grad[~pad] != 0).any()
    torch.testing.assert_close(loss, clean_loss, atol=0, rtol=0)
    assert stats.as_dict() == pytest.approx(clean_stats.as_dict())


def test_fully_padded_batch_gives_zero_loss_not_nan() -> None:
    mask = torch.zeros(2, 3, dtype=torch.long)
    for loss_type in ("grpo", "dapo", "dr_grpo"):
        cfg = GRPOLossConfig(loss_type=loss_type, max_completion_length=3)  # type: ignore[arg-type]
        lp = torch.zeros(2, 3, requires_grad=True)
        loss, stats = grpo_loss(lp, torch.zeros(2, 3), None, torch.ones(2), mask, cfg)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(lp.grad, torch.zeros(2, 3))
        assert math.isnan(stats.as_dict()["clip_ratio/low_min"])


def test_per_token_objective_on_policy_is_minus_advantage() -> None:
    """At ratio 1 the surrogate is -A on every valid token; the grpo weights then average it per sequence."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([2.0, -1.0])
    lp = torch.zeros(2, 3)
    obj, _ = per_token_objective(lp, lp, None, adv, mask, GRPOLossConfig(loss_type="grpo"))
    torch.testing.assert_close(obj, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]))
    # grpo: row means (-2, 1) then batch mean -0.5; dapo: sum -3 over 3 tokens = -1
    torch.testing.assert_close(
        grpo_loss(lp, lp, None, adv, mask, GRPOLossConfig(loss_type="grpo"))[0], torch.tensor(-0.5)
    )
    torch.testing.assert_close(
        grpo_loss(lp, lp, None, adv, mask, GRPOLossConfig(loss_type="dapo"))[0], torch.tensor(-1.0)
    )


def test_masked_mean() -> None:
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert masked_mean(x, mask).item() == 1.5
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.5, 0.0]))


def test_config_validation_names_the_key() -> None:
    with pytest.raises(ValueError, match="loss_type"):
        GRPOLossConfig(loss_type="bnpo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig(loss_type="dr_grpo")
    with pytest.raises(ValueError, match="beta"):
        GRPOLossConfig(beta=-1.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        z = torch.zeros(1, 2)
        grpo_loss(z, z, None, torch.zeros(1), torch.ones(1, 2), GRPOLossConfig(beta=0.1))
    assert GRPOLossConfig(epsilon=0.2).upper_epsilon() == 0.2
    assert GRPOLossConfig(epsilon=0.2, epsilon_high=0.28).upper_epsilon() == 0.28


def test_loss_config_comes_from_the_grpo_section_with_one_validation() -> None:
    from pte.config import GRPOConfig, params_from_dict

    train = params_from_dict({"train": {
        "grpo": {"loss_type": "dr_grpo", "epsilon": 0.1, "epsilon_high": 0.28, "beta": 0.02,
                 "use_bias_correction_kl": True},
        "rollout": {"max_completion_length": 64}}}).train
    assert GRPOLossConfig.from_config(train) == GRPOLossConfig(
        loss_type="dr_grpo", epsilon=0.1, epsilon_high=0.28, beta=0.02, max_completion_length=64,
        use_bias_correction_kl=True)
    for bad in ({"epsilon": 1.0}, {"epsilon": -0.1}, {"epsilon_high": -1.0}, {"beta": float("nan")}):
        with pytest.raises(ValueError) as from_yaml:
            GRPOConfig(**bad)
        with pytest.raises(ValueError) as from_python:
            GRPOLossConfig(**bad)
        assert str(from_yaml.value) == str(from_python.value)
        assert f"`train.grpo.{next(iter(bad))}`" in str(from_yaml.value)


def test_grpo_delta_is_a_params_key_that_reaches_the_loss() -> None:
    from pte.config import params_from_dict

    assert GRPOLossConfig.from_config(params_from_dict({"train": {"grpo": {"delta": 1.5}}}).train).delta == 1.5
    with pytest.raises(ValueError, match="train.grpo.delta"):
        params_from_dict({"train": {"grpo": {"delta": 1.1}}})
