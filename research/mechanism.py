"""The mechanism test: can a method carry one evicted symbol to the point where it is needed? (docs/evaluation.md)

A seconds-long instrument for every design question about the thought state. A frozen tiny model reads sequences

    prompt: [BOS]    thinking: [X, f_1 .. f_n, SEP, X]

where ``X`` is one of ``num_symbols`` symbols drawn per row and ``f_1 .. f_n, SEP`` are fixed fillers. The thinking
window holds ``window`` tokens and evicts ``evict`` (default one) per event, so by the time ``SEP`` is read the first
``X`` has left the cache: only a memory of evicted tokens can predict the final ``X``. The objective is the
teacher-forced NLL of the final ``X`` through the training replay (:func:`pte.engine.replay.replay_logprobs`,
segment-wise backward exactly as in training), and the metric is recall accuracy: the fraction of held-out rows
whose final ``X`` scores highest among the symbols. Chance is ``1 / num_symbols``.

Expected: a full cache (``lora``) solves it (attention reaches ``X``), ``lora_c`` cannot beat chance (nothing of ``X``
is left in its cache, and the fillers carry no information), and PTE can only solve it through its state, so the
gradient must flow through the global tokens, ``Wa_*``, ``A`` and ``B`` end to end.

This module knows nothing about datasets, rewards or the pipeline; it uses the engine as training does.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch

from pte.config import AdapterConfig, CacheConfig, PTEConfig
from pte.engine.adapters import attach_adapter, trains_with_bounded_cache
from pte.engine.cache import CachePlan, plan_cache
from pte.engine.replay import replay_logprobs

__all__ = ["MechanismConfig", "MechanismResult", "build_model", "recall_accuracy", "recall_batch", "run_mechanism",
           "train_recall"]


@dataclass(frozen=True)
class MechanismConfig:
    """One mechanism run: the synthetic task, the adapter and the optimiser."""

    model: str = "random:llama-tiny-wide"
    """Frozen base (a ``random:`` preset keeps it offline and tiny)."""
    num_symbols: int = 8
    """Symbols X is drawn from (chance = 1 / num_symbols)."""
    fillers: int = 8
    """Fixed filler tokens between X and SEP."""
    window: int = 4
    """Thinking-window slots W of the bounded cache."""
    evict: int = 1
    """Tokens evicted per event (``evict_ratio = evict / window``): 1 writes each token alone, larger values write
    it into the state together with ``evict - 1`` others, as a real window does (the demo evicts 8 of 32)."""
    pairs: int = 1
    """1: the plain task above. p > 1: associative recall, ``[K_1 V_1 .. K_p V_p, fillers, SEP, K_q, V_q]``: p
    key/value pairs (fixed keys, random values) are evicted, a random key is asked, its value must be recalled."""
    distractors: bool = False
    """Fillers drawn at random from the symbols instead of fixed: every evicted token then carries content, as in
    a real thought, and the state must keep the one value that is asked for among them. Uses the keyed form
    (``[K_1 V_1 .. , fillers, SEP, K_q, V_q]`` also for one pair), since a position-free state cannot tell the
    first of several random symbols from the others."""
    key_gap: int = 0
    """Random symbols between a key and its value, in the stored pair and in the query (``[K, g_1..g_k, V]``): the
    value is then identified by context ``k + 1`` tokens back, not by the token before it, as a worked solution's
    value is by its line's variable (``d=c-2=4-2=2``). Uses the keyed form."""
    lead: int = 0
    """Random symbols before the first key (keyed form): the stored pairs then sit mid-thought, not at its first
    positions, whose hidden states a causal model marks by position alone (few tokens to attend to)."""
    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    """Rows per step."""
    lr: float = 3e-3
    """AdamW learning rate."""
    rank: int = 8
    """Adapter rank r (and state rank)."""
    global_tokens: int = 8
    """G."""
    eval_rows: int = 256
    """Held-out rows for the accuracy."""
    seed: int = 0
    """Seeds the model, the adapter init and the data."""
    pte: PTEConfig | None = None
    """State settings (None = the defaults with ``global_tokens``); the study varies them."""

    def __post_init__(self) -> None:
        if not 1 <= self.evict <= self.window:
            raise ValueError(f"mechanism: evict = {self.evict!r} is invalid for window = {self.window}; allowed: "
                             "1..window (tokens evicted per event).")

    def pte_config(self) -> PTEConfig:
        base = self.pte or PTEConfig()
        return dataclasses.replace(base, global_tokens=self.global_tokens)


@dataclass(frozen=True)
class MechanismResult:
    method: str
    accuracy: float  # recall accuracy on held-out rows
    chance: float
    final_loss: float  # mean NLL of the recall token over the last 10% of steps
    seconds: float
    curve: tuple[float, ...] = ()  # mean NLL of the recall token over each twelfth of the steps (where a plateau ends)


_BOS, _SYMBOL0, _FILLER0, _SEP, _KEY0 = 1, 65, 97, 58, 48  # byte ids: '"', 'A'.., 'a'.., ':', '0'.. (tokenizer order)


def recall_batch(cfg: MechanismConfig, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt_ids [rows, 1], tokens [rows, T])``: ``[BOS] | [X, f_1..f_n, SEP, X]`` with X random (T = n + 3), or
    with ``pairs = p > 1``, ``distractors``, ``key_gap = k`` or ``lead = l`` the keyed form
    ``[BOS] | [s_1..s_l, K_1 g.. V_1 .. K_p g.. V_p, f_1..f_n, SEP, K_q, g.., V_q]`` (l random symbols s first, k
    random symbols g after each key; T = l + (p + 1)(k + 2) + n + 1)."""
    if cfg.distractors:
        fill = torch.randint(0, cfg.num_symbols, (rows, cfg.fillers), generator=generator) + _SYMBOL0
    else:
        fill = (torch.arange(cfg.fillers) % 26 + _FILLER0).expand(rows, -1)
    sep = torch.full((rows, 1), _SEP)
    if cfg.pairs == 1 and not cfg.distractors and not cfg.key_gap and not cfg.lead:
        x = torch.randint(0, cfg.num_symbols, (rows, 1), generator=generator) + _SYMBOL0
        return torch.full((rows, 1), _BOS), torch.cat([x, fill, sep, x], dim=1)
    values = torch.randint(0, cfg.num_symbols, (rows, cfg.pairs), generator=generator) + _SYMBOL0
    keys = (torch.arange(cfg.pairs) + _KEY0).expand(rows, -1)
    q = torch.randint(0, cfg.pairs, (rows, 1), generator=generator)
    gaps = torch.randint(0, cfg.num_symbols, (rows, cfg.pairs + 1, cfg.key_gap), generator=generator) + _SYMBOL0
    stored = torch.cat([keys[..., None], gaps[:, :-1], values[..., None]], dim=-1).reshape(rows, -1)
    query = torch.cat([keys.gather(1, q), gaps[:, -1], values.gather(1, q)], dim=1)
    lead = torch.randint(0, cfg.num_symbols, (rows, cfg.lead), generator=generator) + _SYMBOL0
    return torch.full((rows, 1), _BOS), torch.cat([lead, stored, fill, sep, query], 1)


def _plan(cfg: MechanismConfig, method: str) -> CachePlan:
    window = cfg.window if trains_with_bounded_cache(method) else None
    return plan_cache(CacheConfig(window=window, evict_ratio=cfg.evict / cfg.window), 1)


def recall_accuracy(model, cfg: MechanismConfig, method: str, generator: torch.Generator,
                    plan: CachePlan | None = None) -> float:
    """Fraction of ``cfg.eval_rows`` fresh rows whose final X scores highest among the symbols (teacher-forced).

    Each candidate symbol is put at the recall position and scored with the same replay as training, so the
    accuracy is measured under exactly the cache the method trains with (or ``plan``).
    """
    prompt, tokens = recall_batch(cfg, cfg.eval_rows, generator)
    plan = plan or _plan(cfg, method)
    mask = torch.ones_like(tokens)
    scores = []
    with torch.no_grad():
        for s in range(cfg.num_symbols):
            cand = tokens.clone()
            cand[:, -1] = _SYMBOL0 + s
            scores.append(replay_logprobs(model, prompt, torch.ones_like(prompt), cand, mask, plan)[:, -1])
    pick = torch.stack(scores, dim=1).argmax(1) + _SYMBOL0
    return float((pick == tokens[:, -1]).float().mean())


def build_model(cfg: MechanismConfig, method: str):
    """The frozen base with ``method``'s adapter (only adapter parameters trainable)."""
    from pte.engine.models import load_model

    model, _ = load_model(cfg.model, seed=cfg.seed)
    model.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    adapter = AdapterConfig(rank=cfg.rank, alpha=2.0 * cfg.rank)
    model = attach_adapter(model, method, adapter, cfg.pte_config())
    model.eval()
    return model


def train_recall(model, cfg: MechanismConfig, method: str, progress: bool = False) -> list[float]:
    """Train the adapter of ``model`` (built by :func:`build_model`) on the recall task; returns the loss per step.

    The loss is the NLL of the recall token, backpropagated from the replay's last segment while earlier segments
    only update the cache and the state, exactly the segment-wise backward of training.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    plan = _plan(cfg, method)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses: list[float] = []
    from tqdm.auto import trange

    for _ in trange(cfg.steps, desc=f"mechanism {method}", disable=not progress):
        prompt, tokens = recall_batch(cfg, cfg.batch_size, gen)

        def on_segment(cols: slice, lp: torch.Tensor, n: int = tokens.shape[1]) -> None:
            if cols.stop == n:  # the recall token is the last column
                loss = -lp[:, -1].mean()
                loss.backward()
                losses.append(float(loss.detach()))

        replay_logprobs(model, prompt, torch.ones_like(prompt), tokens, torch.ones_like(tokens), plan,
                        on_segment=on_segment)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses


def run_mechanism(cfg: MechanismConfig, method: str, progress: bool = False) -> MechanismResult:
    """Build, train and measure ``method`` on the recall task (recall accuracy on fresh rows)."""
    t0 = time.perf_counter()
    model = build_model(cfg, method)
    losses = train_recall(model, cfg, method, progress)
    tail = losses[-max(1, len(losses) // 10):]
    acc = recall_accuracy(model, cfg, method, torch.Generator().manual_seed(cfg.seed + 2))
    parts = torch.tensor(losses, dtype=torch.float64).tensor_split(min(12, len(losses)))
    curve = tuple(round(float(p.mean()), 3) for p in parts)
    return MechanismResult(method, acc, 1.0 / cfg.num_symbols, sum(tail) / len(tail), time.perf_counter() - t0, curve)
