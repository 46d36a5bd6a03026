"""One-off: the mechanism with a fixed per-layer mean subtracted from the evicted K/V (monkeypatched). Arguments: model c
center(0|1) steps batch key_gap [avg: the kernel initialised to 1/c per tap]."""
import json, sys, dataclasses, torch
from pte.mechanism import MechanismConfig, recall_batch, run_mechanism
from pte.models import load_model
from pte.state import unrotate_keys, flatten_heads, SegmentState
from pte.config import PTEConfig
torch.set_num_threads(1)
model_path, c, center = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
steps, bs = int(sys.argv[4]), int(sys.argv[5])
cfg = MechanismConfig(model=model_path, distractors=True, fillers=16, lead=8, key_gap=int(sys.argv[6]), steps=steps,
                      batch_size=bs, eval_rows=128, pte=PTEConfig(write_context=c, gate_horizon=64))
if center:
    m, _ = load_model(model_path, seed=0)
    p, t = recall_batch(cfg, 64, torch.Generator().manual_seed(123))
    ids = torch.cat([p, t], 1)
    with torch.no_grad():
        out = m(ids, use_cache=True)
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        cos, sin = m.model.rotary_emb(out.past_key_values.layers[0].keys, pos)
    mk = torch.stack([flatten_heads(unrotate_keys(l.keys, cos, sin))[:, 1:].reshape(-1, l.keys.shape[1]*l.keys.shape[-1]).mean(0) for l in out.past_key_values.layers])
    mv = torch.stack([flatten_heads(l.values)[:, 1:].reshape(-1, l.values.shape[1]*l.values.shape[-1]).mean(0) for l in out.past_key_values.layers])
    orig = SegmentState.observe
    def observe(self, keys, values, active):
        return orig(self, keys.float() - mk[:, None, None], values.float() - mv[:, None, None], active)
    SegmentState.observe = observe
if len(sys.argv) > 7 and sys.argv[7] == "avg":  # the context kernel starts as a box filter (1/c per tap)
    from pte.state import ThoughtEncoder
    _init = ThoughtEncoder.__init__
    def init(self, *a, **k):
        _init(self, *a, **k)
        with torch.no_grad():
            self.context_k.fill_(1.0 / c); self.context_v.fill_(1.0 / c)
    ThoughtEncoder.__init__ = init
r = run_mechanism(cfg, "pte_no_global", progress=False)
print(json.dumps(dict(model=model_path, c=c, center=center, init=(sys.argv[7] if len(sys.argv) > 7 else "ident"), steps=steps, key_gap=cfg.key_gap, acc=r.accuracy, loss=r.final_loss, s=r.seconds)))
