"""One-off: how much of the pre-RoPE keys' (and values') variance across thinking tokens is explained by the token's
identity and how much by its position, per layer, over the random-symbol tokens of mechanism rows (16 distractors,
lead 8; each position holds any symbol, so the two are not confounded). Argument: the model."""
import sys

import torch

from common import thinking_kv
from pte.mechanism import MechanismConfig
from pte.models import load_model

torch.set_num_threads(1)
model, _ = load_model(sys.argv[1], seed=0)
cfg = MechanismConfig(distractors=True, fillers=16, lead=8)
t, K, V = thinking_kv(model, cfg, 256, 0)


def explained(x: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of the variance of rows x [N, d] explained by the group means."""
    centred = x - x.mean(0)
    total = centred.pow(2).sum()
    between = sum((groups == g).sum() * (x[groups == g].mean(0) - x.mean(0)).pow(2).sum() for g in groups.unique())
    return float(between / total)


tok = t.reshape(-1)
where = torch.arange(t.shape[1]).expand(t.shape[0], -1).reshape(-1)
symbol = (tok >= 65) & (tok < 65 + cfg.num_symbols)  # random symbols only: every position holds any of them
rows = []
for k, v in zip(K.flatten(1, 2), V.flatten(1, 2)):
    k, v, tk, wh = k[symbol], v[symbol], tok[symbol], where[symbol]
    rows.append([explained(k, tk), explained(k, wh), explained(v, tk), explained(v, wh)])
r = torch.tensor(rows)
for name, sel in (("layer 0", r[0]), ("mean", r.mean(0)), ("last", r[-1])):
    print(f"{sys.argv[1]:24s} {name:8s} keys: token {sel[0]:.2f} position {sel[1]:.2f} | values: token {sel[2]:.2f} "
          f"position {sel[3]:.2f}")
