"""One-off: the share of key / value energy in the per-layer mean direction (pre-RoPE keys, values) of a model on
mechanism rows. Argument: the model path or random: preset."""
import torch, sys
from common import thinking_kv
from pte.mechanism import MechanismConfig
from pte.models import load_model
torch.set_num_threads(1)
model, _ = load_model(sys.argv[1], seed=0)
cfg = MechanismConfig(distractors=True, fillers=16, lead=8, key_gap=3)
_, K, V = thinking_kv(model, cfg, 32, 0)
for l, (k, v) in enumerate(zip(K, V)):
    def frac(x):
        x = x.reshape(-1, x.shape[-1]).float(); m = x.mean(0)
        return float(m.pow(2).sum() / x.pow(2).sum(-1).mean())
    if l % 3 == 0 or l == len(K) - 1:
        print(l, "K mean-energy %.2f  V %.2f" % (frac(k), frac(v)), "norms", float(k.norm(dim=-1).mean()), float(v.norm(dim=-1).mean()))
