"""The cache-aware training loop on a DeepSpeed engine (docs/method.md, "Loss and training", "Objectives").

One step of ``grpo`` (the paper's Eq. 3): pick prompts -> sample a group of completions per prompt under the method's
cache (bounded for ``lora_c`` and PTE, full for ``lora``) -> rewards -> group advantages -> replay every completion
under the same eviction schedule, computing the loss segment by segment and backpropagating each segment at once ->
one optimizer step. On-policy ``distill`` samples the same way and pulls every sampled position toward the
adapter-disabled, full-cache model; ``sft`` and ``distill`` on ``solutions`` replay worked solutions instead of
rollouts (no sampling). The per-chunk losses are :mod:`pte.training.objectives`.

Safety: every rollout step checks replay against rollout log-probs (a probability gap, naming the worst token); a
NaN/inf reward or loss stops the run before the optimizer step, naming the step, and the last good checkpoint is left
as it was. Checkpoints are atomic and a restarted run resumes from the latest one bit-exactly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pte.config import CacheConfig, Params
from pte.config.numerics import derive_seed
from pte.config.training import eviction_weight, learning_rate, recall_weight
from pte.data.rewards import reward_function
from pte.data.tasks import recall_score
from pte.engine.adapters import (
    adapter_state_dict,
    adapters_disabled,
    attach_adapter,
    load_adapter_weights,
    save_adapter,
    trains_with_bounded_cache,
)
from pte.engine.cache import CachePlan, plan_cache
from pte.engine.inference import completion_ids, decode_completion, encode_prompts, eos_ids
from pte.engine.replay import replay_logprobs
from pte.engine.rollout import Rollout, generate
from pte.pipeline.tracking import JsonlTracker, MultiTracker, NullTracker, Tracker
from pte.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from pte.training.grpo import GRPOLossConfig, group_advantages, token_weights
from pte.training.objectives import (
    ChunkTotals,
    FullCacheTeacher,
    ReplayGap,
    grpo_chunk,
    jsd_loss,
    replay_gap,
    sft_batch,
    sft_chunk,
    sft_token_weights,
    sft_weights,
    token_kl,
)
from pte.training.runtime import (
    Runtime,
    align_ranks,
    all_reduce,
    init_engine,
    is_main,
    left_pad,
    peak_memory_bytes,
    rank,
    seed_everything,
    select_rows,
    world_size,
)
from pte.training.sensitivity import load_sensitivities, step_sensitivity

__all__ = ["ReplayMismatchError", "TrainingDivergedError", "select_rows", "train"]

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[float]]


class ReplayMismatchError(RuntimeError):
    """Replay log-probs differ from rollout log-probs: the loss would optimize the wrong policy."""


class TrainingDivergedError(RuntimeError):
    """A reward or the loss became NaN/inf."""


class Trainer:
    """Holds the engine and everything one step needs; ``run`` drives the loop."""

    def __init__(self, params: Params, method: str, prompts: list[str], answers: list[str], out_dir: str | Path,
                 tracker: Tracker | None = None, reward_fn: RewardFn | None = None,
                 problems: list[str] | None = None, solutions: list[str] | None = None,
                 sensitivity: str | Path | None = None):
        if len(prompts) != len(answers) or not prompts:
            raise ValueError("training needs a non-empty list of prompts with one answer each")
        if params.train.teacher_forced() and (solutions is None or len(solutions) != len(prompts)):
            raise ValueError(f"train.objective = {params.train.objective!r} (on worked solutions) needs a worked "
                             "solution for every training row; use a source with a solution writer (var_chain, "
                             "reasoning_gym:chain_sum), objective grpo, or distill with train.distill.source: "
                             "rollouts.")
        self.params, self.method, self.prompts, self.answers = params, method, prompts, answers
        self.problems, self.solutions = problems, solutions
        self._rows: list[int] = []  # the training rows of the current step (this rank's share)
        # the eviction sensitivity of the weighted steps, computed once by the sensitivity stage (else in the loop)
        self.sensitivity = {} if sensitivity is None else load_sensitivities(sensitivity)
        self.out_dir = Path(out_dir)
        self.reward_fn = reward_fn or reward_function(params.train.grpo, params.data)
        cfg = params.train
        if cfg.prompts_per_step % world_size():
            raise ValueError(f"train.prompts_per_step = {cfg.prompts_per_step} must be a multiple of the number of "
                             f"processes ({world_size()}).")
        self.runtime = Runtime(cfg)
        seed_everything(params.base.seed)
        model, self.tok = self.runtime.load_base(params)
        self.model = attach_adapter(model, method, params.adapter, params.pte)
        if cfg.init_adapter:
            load_adapter_weights(self.model, method, cfg.init_adapter)
        if cfg.gradient_checkpointing and not trains_with_bounded_cache(method):  # used by the full-cache replay
            model.activation_checkpointing_enable({"use_reentrant": False})
        self.engine = init_engine(self.model, cfg, self.runtime)
        self.cache_cfg = params.cache if trains_with_bounded_cache(method) else CacheConfig(window=None)
        self.loss_cfg = GRPOLossConfig.from_config(params.train)
        local = JsonlTracker(self.out_dir / "metrics.jsonl") if is_main() else NullTracker()
        self.tracker = MultiTracker(local, tracker) if (tracker is not None and is_main()) else local
        self.step = self.first_step = 0

    # -- one step -------------------------------------------------------------------------------------------------
    def _rollouts(self, rows: list[int]) -> tuple[list[Rollout], list[torch.Tensor]]:
        """Sample the step's groups: ``(chunks, [rewards [B], recall [2]])``, recall = (values recalled right, recalls)
        of the rollouts (zeros without problem texts)."""
        cfg = self.params.train.rollout
        g = cfg.num_generations
        prompts = [self.prompts[i] for i in rows for _ in range(g)]
        chunks, texts = [], []
        eos = eos_ids(self.model, self.tok)
        for c in range(0, len(prompts), cfg.batch):
            ids, mask = encode_prompts(self.tok, prompts[c : c + cfg.batch], device=self.runtime.device,
                                       system=self.params.data.system_prompt)
            if world_size() > 1:  # one prompt block width on all ranks: the same cache plan, so the same replay chunks
                width = int(all_reduce([float(ids.shape[1])], self.runtime.device, "max")[0])
                ids, mask = left_pad(ids, mask, width, self.tok.pad_token_id)
            gen = torch.Generator(device=self.runtime.device).manual_seed(
                derive_seed(self.params.base.seed, "rollout", self.step, rank(), c))
            out = generate(self.model, ids, mask, self.cache_cfg, cfg.sampling(), eos,
                           self.tok.pad_token_id, generator=gen, sync_ranks=True)
            chunks.append(out)
            texts += [decode_completion(self.tok, ids, eos) for ids in completion_ids(out)]
        answers = [self.answers[i] for i in rows for _ in range(g)]
        rewards = torch.tensor(self.reward_fn(texts, answers), dtype=torch.float32)
        hits = [] if self.problems is None else [
            recall_score(self.problems[i], t) for i, t in zip([i for i in rows for _ in range(g)], texts, strict=True)]
        recall = torch.tensor([float(sum(h for h, _ in hits)), float(sum(n for _, n in hits))])
        return chunks, [rewards, recall]

    def _reference(self, out: Rollout, rows: slice) -> torch.Tensor | None:
        if self.loss_cfg.beta == 0.0:
            return None
        plan = out.plan if self.params.train.grpo.kl_cache == "bounded" else CachePlan(out.plan.prompt_len, None, 0)
        with torch.no_grad(), adapters_disabled(self.model):
            return replay_logprobs(self.model, out.prompt_ids[rows], out.prompt_mask[rows], out.tokens[rows],
                                   out.mask[rows], plan, self.params.train.rollout.temperature)

    def _update(self, chunks: list[Rollout], advantages: torch.Tensor, check: bool) -> dict[str, float]:
        cfg, dev, temp = self.params.train, self.runtime.device, self.params.train.rollout.temperature
        chunks = align_ranks(chunks, self.tok.pad_token_id, dev)  # same forwards/backwards on every rank
        rows = sum(c.tokens.shape[0] for c in chunks)
        tokens = sum(float(c.mask.sum()) for c in chunks)
        world = world_size()
        num_seq, num_tok = (x / world for x in all_reduce([float(rows), tokens], dev))
        totals, offset = ChunkTotals(), 0
        exact = self.params.train.grpo.kl_estimator == "exact" and self.loss_cfg.beta > 0
        for out in chunks:
            weights = token_weights(out.mask, self.loss_cfg.loss_type, self.loss_cfg.max_completion_length,
                                    num_sequences=num_seq, num_tokens=num_tok)
            for m in range(0, out.tokens.shape[0], cfg.micro_batch):
                sl = slice(m, m + cfg.micro_batch)
                adv = advantages[offset + m : offset + m + out.tokens[sl].shape[0]].to(dev)
                ref = None if exact else self._reference(out, sl)
                teacher = FullCacheTeacher(self.model, out.prompt_ids[sl], out.prompt_mask[sl],
                                           out.tokens[sl]) if exact else None

                def on_segment(cols, lp, logits=None, sl=sl, out=out, w=weights, ref=ref, adv=adv, teacher=teacher,
                               row0=offset + m):
                    kl = None if teacher is None else token_kl(logits, teacher.logits(cols), temp)
                    loss, stats = grpo_chunk(lp, out.logprobs[sl, cols], None if ref is None else ref[:, cols], adv,
                                             out.mask[sl, cols], w[sl, cols], self.loss_cfg, kl)
                    self._backward(loss)
                    totals.add(loss, replay_gap(lp, out.logprobs[sl, cols], out.mask[sl, cols], row0, cols.start),
                               stats)

                replay_logprobs(self.model, out.prompt_ids[sl], out.prompt_mask[sl], out.tokens[sl], out.mask[sl],
                                out.plan, temp, on_segment=on_segment, with_logits=exact)
            offset += out.tokens.shape[0]
        replay = self._check_replay(totals.gap, check)
        self.engine.step()
        result = {"loss": totals.loss, **replay}
        if totals.stats is not None:
            result.update(totals.stats.as_dict())
        return result

    def _sft_update(self, rows: list[int]) -> dict[str, float]:
        """One teacher-forced step on the rows' worked solutions under the method's training cache: the ``sft`` NLL,
        or (``distill`` on ``solutions``) the divergence from the adapter-disabled full-cache model, plus
        ``train.distill.nll_weight`` times the NLL."""
        cfg, dev, tok = self.params.train, self.runtime.device, self.tok
        batch = sft_batch(tok, [self.prompts[i] for i in rows], [self.problems[i] for i in rows],
                          [self.solutions[i] for i in rows], self.params.data.system_prompt,
                          eos_ids(self.model, tok)[0], dev)
        plan = plan_cache(self.cache_cfg, batch.prompt_ids.shape[1])
        distill = cfg.objective == "distill"
        w_recall = 1.0 if distill else recall_weight(cfg, self.step)
        nll_weight = cfg.distill.nll_weight if distill else 1.0
        weights, agreement = sft_token_weights(self.model, batch, plan, sft_weights(batch.mask, batch.recall, w_recall),
                                               eviction_weight(cfg, self.step), cfg.micro_batch,
                                               cfg.sft.eviction_threshold,
                                               step_sensitivity(self.sensitivity, self.step, rows, batch.tokens))
        num_tok, weight = all_reduce([float(batch.mask.sum()), float(weights.sum())], dev)
        sums = torch.zeros(5, dtype=torch.float64)  # nll, recall nll, recall hits, recall tokens, divergence

        for m in range(0, len(rows), cfg.micro_batch):
            sl = slice(m, m + cfg.micro_batch)
            teacher = FullCacheTeacher(self.model, batch.prompt_ids[sl], batch.prompt_mask[sl],
                                       batch.tokens[sl]) if distill else None

            def on_segment(cols, lp, logits, sl=sl, teacher=teacher):
                nll, counts = sft_chunk(lp, logits, batch.tokens[sl, cols], batch.mask[sl, cols],
                                        batch.recall[sl, cols], weight, weights[sl, cols])
                loss = nll * nll_weight
                if teacher is not None:
                    div = jsd_loss(logits, teacher.logits(cols), batch.mask[sl, cols], cfg.distill.beta, num_tok)
                    loss = loss + div
                    sums[4] += float(div.detach())
                self._backward(loss)
                sums[:4].add_(counts)

            replay_logprobs(self.model, batch.prompt_ids[sl], batch.prompt_mask[sl], batch.tokens[sl],
                            batch.mask[sl], plan, 1.0, on_segment=on_segment, with_logits=True)
        self.engine.step()
        nll, r_nll, r_hits, r_n, div = all_reduce(sums.tolist(), dev)
        out = {"loss": nll / num_tok, "completions/mean_length": num_tok / max(1, len(rows) * world_size())}
        if distill:
            out.update({"loss": div + nll_weight * nll / num_tok, "nll": nll / num_tok, "distill/divergence": div})
        if r_n:
            out.update({"recall/nll": r_nll / r_n, "recall/token_accuracy": r_hits / r_n})
        if agreement is not None:
            rows_r, top, above, hit, recalls = all_reduce(agreement.tolist(), dev)
            out.update({"eviction/weight_mean": weight / num_tok,
                        **({"eviction/recall_is_top": top / rows_r} if rows_r else {}),
                        **({"eviction/precision": hit / above} if above else {}),
                        **({"eviction/recall": hit / recalls} if recalls else {})})
        return out

    def _distill_update(self, chunks: list[Rollout], check: bool) -> dict[str, float]:
        """One step of on-policy distillation toward the adapter-disabled full-cache model, chunk by chunk."""
        cfg, dev, temp = self.params.train, self.runtime.device, self.params.train.rollout.temperature
        chunks = align_ranks(chunks, self.tok.pad_token_id, dev)
        num_tok = all_reduce([sum(float(c.mask.sum()) for c in chunks)], dev)[0]
        totals, offset = ChunkTotals(), 0
        for out in chunks:
            for m in range(0, out.tokens.shape[0], cfg.micro_batch):
                sl = slice(m, m + cfg.micro_batch)
                teacher = FullCacheTeacher(self.model, out.prompt_ids[sl], out.prompt_mask[sl], out.tokens[sl])

                def on_segment(cols, lp, logits, sl=sl, teacher=teacher, out=out, row0=offset + m):
                    old, mask = out.logprobs[sl, cols], out.mask[sl, cols]
                    loss = jsd_loss(logits, teacher.logits(cols), mask, cfg.distill.beta, num_tok, temp)
                    self._backward(loss)
                    totals.add(loss, replay_gap(lp, old, mask, row0, cols.start))

                replay_logprobs(self.model, out.prompt_ids[sl], out.prompt_mask[sl], out.tokens[sl], out.mask[sl],
                                out.plan, temp, on_segment=on_segment, with_logits=True)
            offset += out.tokens.shape[0]
        replay = self._check_replay(totals.gap, check)
        self.engine.step()
        total = all_reduce([totals.loss], dev)[0]
        return {"loss": total, "distill/divergence": total, **replay}

    def _check_replay(self, gap: ReplayGap, check: bool) -> dict[str, float]:
        """The step's replay gaps over the ranks (``replay/*`` metrics); on the checked step, raises when the largest
        probability gap exceeds the tolerance, naming the worst token."""
        # every rank takes the same decision (a lone raise would deadlock the others)
        prob, logprob = all_reduce([gap.prob, gap.logprob], self.runtime.device, "max")
        key, tolerance = self.replay_tolerance()
        if check and prob > tolerance:
            g = self.params.train.rollout.num_generations
            where = (f"training row {self._rows[gap.row // g]} (sample {gap.row % g}), completion token {gap.col}: "
                     f"probability {math.exp(gap.rollout_logprob):.4g} in the rollout, "
                     f"{math.exp(gap.replay_logprob):.4g} in the replay" if gap.prob == prob else "another rank")
            raise ReplayMismatchError(
                f"step {self.step}: replay log-probs differ from rollout log-probs: a token's probability moved by "
                f"{prob:.2e} (> train.rollout.{key} = {tolerance:g}, precision {self.runtime.precision}) at {where}. "
                "The replay does not reproduce the rollout's cache or state (an eviction, a position or a state update "
                "differs), so the loss would train another policy. Check in fp32 (train.precision: fp32); if it "
                "persists, report the model family and this message.")
        return {"replay/max_prob_diff": prob, "replay/max_abs_diff": logprob}

    def replay_tolerance(self) -> tuple[str, float]:
        """``(setting, value)`` of the replay check's bound for this run's precision (bf16 rounds far more)."""
        cfg = self.params.train.rollout
        if self.runtime.precision == "bf16":
            return "replay_tolerance_bf16", cfg.replay_tolerance_bf16
        return "replay_tolerance", cfg.replay_tolerance

    def _backward(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise TrainingDivergedError(f"step {self.step}: the loss is {loss.item()}; stopping before the optimizer "
                                        "step (the last checkpoint is untouched).")
        self.engine.backward(loss, scale_wrt_gas=False)

    def train_step(self) -> dict[str, float]:
        cfg = self.params.train
        rows = select_rows(len(self.prompts), self.step, cfg.prompts_per_step, self.params.base.seed)
        rows = self._rows = rows[rank()::world_size()]
        t0 = time.perf_counter()
        lr = learning_rate(cfg, self.step)
        for group in self.engine.optimizer.param_groups:  # set before this step's engine.step()
            group["lr"] = lr
        if cfg.teacher_forced():
            metrics = self._sft_update(rows)
            metrics.update({"lr": lr, "timing/update_s": time.perf_counter() - t0,
                            "memory/peak_bytes": float(peak_memory_bytes(self.runtime.device))})
            return metrics
        chunks, (rewards, recall) = self._rollouts(rows)
        t1 = time.perf_counter()
        if not torch.isfinite(rewards).all():
            raise TrainingDivergedError(f"step {self.step}: a reward is NaN/inf ({rewards.tolist()}); stopping before "
                                        "the optimizer step (the last checkpoint is untouched).")
        g = self.params.train.rollout.num_generations
        adv = group_advantages(rewards, g, scale=self.params.train.grpo.scale_rewards)
        check = self.params.train.rollout.check_replay
        if cfg.objective == "distill":
            metrics = self._distill_update(chunks, check)
        else:
            metrics = self._update(chunks, adv, check)
        t2 = time.perf_counter()
        groups = rewards.view(-1, g)
        lengths = torch.cat([c.mask.sum(-1) for c in chunks]).float()
        finished = torch.cat([c.finished for c in chunks]).float()
        evictions = torch.cat([c.num_evictions for c in chunks]).float()
        metrics.update({
            "reward": float(rewards.mean()), "reward_std": float(groups.std(-1, unbiased=False).mean()),
            "frac_reward_zero_std": float((groups.std(-1) < 1e-8).float().mean()),
            "completions/mean_length": float(lengths.mean()), "completions/clipped_ratio": float(1 - finished.mean()),
            "cache/evictions": float(evictions.mean()),
            "memory/peak_bytes": float(peak_memory_bytes(self.runtime.device)),
            "timing/rollout_s": t1 - t0, "timing/update_s": t2 - t1, "lr": lr,
        })
        hits, total = all_reduce(recall.tolist(), self.runtime.device)
        if total:
            metrics["recall/accuracy"] = hits / total
        return metrics

    # -- loop -----------------------------------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        meta = {"method": self.method, "params": self.params.to_dict(), "data_position": self.step *
                self.params.train.prompts_per_step}
        save_checkpoint(self.engine, self.out_dir / "checkpoints", self.step, meta, adapter_state_dict(self.model),
                        keep=self.params.train.keep_checkpoints)

    def _run_signature(self, params: dict) -> dict:
        """The settings a checkpoint must share to be resumed (the step budget and I/O cadence may change)."""
        # the replay check only decides whether to stop; it changes no weight
        train = {k: v for k, v in params.get("train", {}).items()
                 if k not in ("steps", "save_every", "keep_checkpoints", "methods")}
        train["rollout"] = {k: v for k, v in train.get("rollout", {}).items()
                            if k not in ("check_replay", "replay_tolerance", "replay_tolerance_bf16")}
        keep = ("base", "model", "cache", "adapter", "pte")
        return {**{k: params.get(k) for k in keep}, "train": train,
                "allow_last_number": params.get("data", {}).get("allow_last_number")}

    def resume(self) -> bool:
        """Continue from the latest checkpoint; a checkpoint of other settings is discarded (fresh start)."""
        path = latest_checkpoint(self.out_dir / "checkpoints")
        if path is None:
            return False
        saved = json.loads((path / "meta.json").read_text())
        if saved.get("method") != self.method or (
                self._run_signature(saved.get("params", {})) != self._run_signature(self.params.to_dict())):
            log.warning("checkpoints in %s were written with other settings or another method; starting over",
                        self.out_dir / "checkpoints")
            if is_main():
                shutil.rmtree(self.out_dir / "checkpoints", ignore_errors=True)
                (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            return False
        meta = load_checkpoint(self.engine, path)
        self.step = int(meta["step"])
        log.info("resumed from %s at step %d", path, self.step)
        return True

    def run(self, progress: bool = True) -> dict[str, float]:
        from tqdm.auto import tqdm

        cfg = self.params.train
        self.first_step = self.step
        # here, not in __init__: resume() may delete a stale metrics.jsonl, and the file must describe its own run
        self.tracker.log_params({"method": self.method, **self.params.to_dict()})
        last: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.method}",
                   disable=not (progress and is_main()))
        while self.step < cfg.steps:
            last = self.train_step()
            self.tracker.log_metrics(last, self.step)
            self.step += 1
            bar.update(1)
            shown = {"sft": ("loss", "recall/token_accuracy"), "distill": ("reward", "distill/divergence")}.get(
                cfg.objective, ("reward", "kl"))
            bar.set_postfix({k.rsplit("/", 1)[-1]: f"{last[k]:.4f}" for k in shown if k in last},
                            s=f"{last.get('timing/rollout_s', 0.0) + last['timing/update_s']:.1f}")
            if self.step % cfg.save_every == 0 or self.step == cfg.steps:
                self._checkpoint()
        bar.close()
        if is_main():
            save_adapter(self.model, self.out_dir / "adapter", self.method, self.params.adapter, self.params.pte,
                         base_model=self.params.model.source)
        return last


def train(params: Params, method: str, prompts: list[str], answers: list[str], out_dir: str | Path,
          tracker: Tracker | None = None, resume: bool = True, progress: bool = True,
          problems: list[str] | None = None, solutions: list[str] | None = None,
          sensitivity: str | Path | None = None) -> dict[str, float]:
    """Train ``method`` with ``train.objective`` and write ``out_dir/{adapter, checkpoints, metrics.jsonl}``.

    ``problems`` (the raw problem texts) turn on the recall metrics; ``solutions`` (worked solutions) are needed by
    the ``sft`` objective; ``sensitivity``: the eviction sensitivities computed beforehand
    (:mod:`pte.training.sensitivity`). Returns the last step's metrics (empty when resuming a finished run).
    """
    trainer = Trainer(params, method, prompts, answers, out_dir, tracker, problems=problems, solutions=solutions,
                      sensitivity=sensitivity)
    if resume:
        if trainer.resume() and is_main():
            # said on stderr, not only logged: a rerun of a killed `dvc repro` shows that it continues
            print(f"train {method}: resuming from the checkpoint of step {trainer.step} of {params.train.steps}",
                  file=sys.stderr)
    elif latest_checkpoint(Path(out_dir) / "checkpoints") is not None:
        raise ValueError(f"{out_dir} already holds checkpoints; resume, or pass a new output directory.")
    return trainer.run(progress=progress)

