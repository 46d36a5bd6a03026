"""One-off: is the WRITE's content usable? Only the value token's K/V are written (every other evicted token zeroed)."""
import json, sys, torch
import pte.mechanism as M
from pte.state import SegmentState
from pte.config import PTEConfig
torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
keep_key = args.get("keep", "v")
cfg = M.MechanismConfig(model=args.get("model", "random:llama-tiny-wide"), distractors=True, fillers=16, lead=8,
                        steps=int(args.get("steps", 60)), batch_size=int(args.get("bs", 16)), eval_rows=128,
                        pte=PTEConfig(write_context=int(args.get("c", 1)), gate_horizon=64))
_obs, _init = SegmentState.observe, SegmentState.__init__
def init(self, *a, **k):
    _init(self, *a, **k); self.seen = 0
def observe(self, keys, values, active):
    m = keys.shape[-2]; idx = torch.arange(self.seen, self.seen + m); self.seen += m
    want = {"v": [cfg.lead + 1], "kv": [cfg.lead, cfg.lead + 1]}[keep_key]
    mask = torch.tensor([int(i) in want for i in idx], dtype=torch.float32)[None, None, :, None]
    return _obs(self, keys.float() * mask, values.float() * mask, active)
SegmentState.__init__, SegmentState.observe = init, observe
r = M.run_mechanism(cfg, "pte_no_global")
print(json.dumps(dict(args=args, acc=r.accuracy, curve=r.curve)))
