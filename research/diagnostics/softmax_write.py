"""One-off: the write as softmax attention pooling of the global queries over every evicted token (monkeypatched).

Instead of the paper's linear sum ``qa (K~^T V~) / (sqrt(r) m)`` each global query g pools the evicted values with
``softmax_t(qa_g . k~_t / sqrt(r))``, over all tokens evicted so far (the replay keeps every event with gradient, so
``gate_horizon`` must cover the row). Softmax is invariant to a score shared by all tokens, so the mean key (75-93%
of the demo model's key energy) drops out of the selection, and its gradient ``p_t (v~_t - S)`` is centred.
Arguments: key=value (model, method, write, init=equal (1/c kernel start), tau (bounded scores), c, steps, bs, fillers, lead, lr)."""
import json
import math
import sys

import torch
import torch.nn.functional as F

import pte.mechanism as M
from pte.config import PTEConfig
from pte.state import SegmentState, normalize_rows

torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
TAU = float(args.get("tau", 0))  # > 0: scores = tau * cos(q_g Wa_Q, k_t Wa_K), bounded in [-tau, tau]
cfg = M.MechanismConfig(model=args.get("model", "random:llama-tiny-wide"), distractors=True,
                        fillers=int(args.get("fillers", 16)), lead=int(args.get("lead", 8)),
                        steps=int(args.get("steps", 60)), batch_size=int(args.get("bs", 16)), eval_rows=128,
                        lr=float(args.get("lr", 3e-3)),
                        pte=PTEConfig(write_context=int(args.get("c", 2)), gate_horizon=256))


def observe(self, keys, values, active):
    """Keep every event's raw K/V (and the context carry before it) for the pooled write."""
    keys, values = keys.float(), values.float()
    before, self.carry = self.encoder.carries(keys, values, self.carry)
    self.recent.append((keys, values, active.view(1, -1, 1, 1).float(), *before))
    assert len(self.recent) <= self.cfg.gate_horizon


def build(self):
    qa, s_global = self.encoder.project_globals(self.layers)
    base = s_global.unsqueeze(1).expand(-1, self.batch_size, -1, -1)
    if not self.recent:
        self.current = normalize_rows(base, self.cfg.eps)
        return self.current
    ke, ve, keep = [], [], []
    for e in self.recent:
        k, v, kp = self._mixed(e)
        pk, pv = self.encoder.project_evicted(k, v)  # [L, B, m, r]
        ke.append(pk)
        ve.append(pv)
        keep.append(kp.expand(-1, -1, k.shape[-2], -1)[..., 0])  # [1, B, m]
    ke, ve, keep = torch.cat(ke, -2), torch.cat(ve, -2), torch.cat(keep, -1)
    if TAU:  # bounded scores: cosine of the projected query and key times a fixed temperature
        qa, ke = F.normalize(qa, dim=-1) * TAU, F.normalize(ke, dim=-1) * math.sqrt(qa.shape[-1])
    scores = qa.unsqueeze(1) @ ke.transpose(-1, -2) / math.sqrt(qa.shape[-1])  # [L, B, G, M]
    scores = scores.masked_fill(keep.unsqueeze(-2) == 0, float("-inf"))
    pooled = torch.softmax(scores, -1).nan_to_num(0.0) @ ve  # [L, B, G, r]
    self.current = normalize_rows(base + pooled, self.cfg.eps)
    return self.current


if args.get("init") == "equal":  # the context kernel starts with all c taps at 1/c instead of the identity
    _build = M.build_model

    def build_model(cfg, method):
        model = _build(cfg, method)
        enc = next(m for m in model.modules() if hasattr(m, "context_k"))
        with torch.no_grad():
            enc.context_k.fill_(1.0 / enc.context_k.shape[1])
            enc.context_v.fill_(1.0 / enc.context_v.shape[1])
        return model

    M.build_model = build_model
if args.get("write", "softmax") == "softmax":  # write=linear: the same run with the engine's (paper's) linear write
    SegmentState.observe = observe
    SegmentState.build = build
r = M.run_mechanism(cfg, args.get("method", "pte_no_global"))
print(json.dumps(dict(script="softmax_write.py", args=args, acc=r.accuracy, loss=r.final_loss, curve=r.curve,
                      s=round(r.seconds))))
