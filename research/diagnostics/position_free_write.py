"""One-off: write the evicted keys/values with the directions that position explains projected out (monkeypatched).

Per layer, the mean pre-RoPE key (value) of the random-symbol tokens at each thinking position is taken on calibration
rows (another seed), centred, and its top-k singular directions U are removed together with the overall mean:
``k <- (k - mean) (I - U U^T)``. Then the mechanism runs as usual. Arguments: key=value (model, c, k, steps, bs,
fillers, lead)."""
import json
import sys

import torch

import pte.mechanism as M
from common import thinking_kv
from pte.config import PTEConfig
from pte.models import load_model
from pte.state import SegmentState

torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
cfg = M.MechanismConfig(model=args.get("model", "random:llama-tiny-wide"), distractors=True,
                        fillers=int(args.get("fillers", 16)), lead=int(args.get("lead", 8)),
                        steps=int(args.get("steps", 60)), batch_size=int(args.get("bs", 16)), eval_rows=128,
                        pte=PTEConfig(write_context=int(args.get("c", 2)), gate_horizon=64))
k_dirs = int(args.get("k", 8))
model, _ = load_model(cfg.model, seed=0)
t, K, V = thinking_kv(model, cfg, 256, 123)
symbol = (t >= 65) & (t < 65 + cfg.num_symbols)  # [B, T]


def projector(x: torch.Tensor):
    """x [B, T, d] of one layer -> (mean [d], P [d, d]) removing the mean and the top-k position directions."""
    mean = x[symbol].mean(0)
    per_pos = torch.stack([x[:, j][symbol[:, j]].mean(0) for j in range(x.shape[1]) if symbol[:, j].any()]) - mean
    u = torch.linalg.svd(per_pos, full_matrices=False).Vh[:k_dirs].T  # [d, k]
    return mean, torch.eye(x.shape[-1]) - u @ u.T


mk, pk = (torch.stack(z) for z in zip(*map(projector, K)))
mv, pv = (torch.stack(z) for z in zip(*map(projector, V)))
_obs = SegmentState.observe


def observe(self, keys, values, active):
    keys = (keys.float() - mk[:, None, None]) @ pk[:, None]
    values = (values.float() - mv[:, None, None]) @ pv[:, None]
    return _obs(self, keys, values, active)


SegmentState.observe = observe
r = M.run_mechanism(cfg, "pte_no_global")
print(json.dumps(dict(script="position_free_write.py", args=args, acc=r.accuracy, loss=r.final_loss, curve=r.curve,
                      s=round(r.seconds))))
