"""One-off: the share of key / value energy in the per-layer mean direction (pre-RoPE keys, values) of a model on
mechanism rows. Argument: the model path or random: preset."""
import torch, sys
from pte.mechanism import MechanismConfig, recall_batch
from pte.models import load_model
from pte.state import unrotate_keys, flatten_heads
torch.set_num_threads(1)
model, _ = load_model(sys.argv[1], seed=0)
cfg = MechanismConfig(distractors=True, fillers=16, lead=8, key_gap=3)
p, t = recall_batch(cfg, 32, torch.Generator().manual_seed(0))
ids = torch.cat([p, t], 1)
with torch.no_grad():
    out = model(ids, use_cache=True)
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cos, sin = model.model.rotary_emb(out.past_key_values.layers[0].keys, pos)
for l, layer in enumerate(out.past_key_values.layers):
    k = flatten_heads(unrotate_keys(layer.keys, cos, sin))[:, 1:]  # thinking tokens
    v = flatten_heads(layer.values)[:, 1:]
    def frac(x):
        x = x.reshape(-1, x.shape[-1]).float(); m = x.mean(0)
        return float(m.pow(2).sum() / x.pow(2).sum(-1).mean())
    if l % 3 == 0 or l == len(out.past_key_values.layers) - 1:
        print(l, "K mean-energy %.2f  V %.2f" % (frac(k), frac(v)), "norms", float(k.norm(dim=-1).mean()), float(v.norm(dim=-1).mean()))
