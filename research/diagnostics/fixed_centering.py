"""One-off: the mechanism with a fixed per-layer mean subtracted from the evicted K/V (monkeypatched). Arguments: model c
center(0|1) steps batch key_gap [avg: the kernel initialised to 1/c per tap]."""
import json, sys, dataclasses, torch
from common import thinking_kv
from pte.mechanism import MechanismConfig, run_mechanism
from pte.models import load_model
from pte.state import SegmentState
from pte.config import PTEConfig
torch.set_num_threads(1)
model_path, c, center = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
steps, bs = int(sys.argv[4]), int(sys.argv[5])
cfg = MechanismConfig(model=model_path, distractors=True, fillers=16, lead=8, key_gap=int(sys.argv[6]), steps=steps,
                      batch_size=bs, eval_rows=128, pte=PTEConfig(write_context=c, gate_horizon=64))
if center:
    m, _ = load_model(model_path, seed=0)
    _, K, V = thinking_kv(m, cfg, 64, 123)
    mk, mv = K.mean((1, 2)), V.mean((1, 2))  # [L, d_kv]
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
