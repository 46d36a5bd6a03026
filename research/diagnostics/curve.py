"""One-off: the mechanism learning curve with variants the settings do not offer (monkeypatched): context kernel init
(ident | ones | avg), an encoder learning-rate multiplier, an alpha multiplier, rank and G. key=value arguments. The curve is
the loss over twelfths of the steps (MechanismResult.curve)."""
import json, sys, dataclasses, torch
import pte.mechanism as M
from pte.config import PTEConfig
from pte.state import ThoughtEncoder
torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
model = args.get("model", "random:llama-tiny-wide")
c = int(args.get("c", 2)); steps = int(args.get("steps", 300)); bs = int(args.get("bs", 16))
init = args.get("init", "ident"); enc_mult = float(args.get("enc_mult", 1)); lr = float(args.get("lr", 3e-3))
gap = int(args.get("gap", 0))
cfg = M.MechanismConfig(model=model, distractors=True, fillers=16, lead=8, key_gap=gap, steps=steps, batch_size=bs,
                        eval_rows=int(args.get("eval", 128)), lr=lr, pte=PTEConfig(write_context=c, gate_horizon=64))
orig_init = ThoughtEncoder.__init__
def init_(self, *a, **k):
    orig_init(self, *a, **k)
    if c > 1 and init != "ident":
        with torch.no_grad(): self.context_k.fill_(1.0 if init == "ones" else 1.0 / c); self.context_v.fill_(1.0 if init == "ones" else 1.0 / c)
ThoughtEncoder.__init__ = init_
orig_adamw = torch.optim.AdamW
def adamw(params, lr, weight_decay):
    params = list(params)
    m = M._model
    enc = {id(p) for n, p in m.named_parameters() if p.requires_grad and ("encoder" in n)}
    groups = [dict(params=[p for p in params if id(p) in enc], lr=lr * enc_mult), dict(params=[p for p in params if id(p) not in enc], lr=lr)]
    return orig_adamw(groups, lr=lr, weight_decay=weight_decay)
M.torch.optim.AdamW = adamw
METHOD = args.get("method", "pte_no_global")
amult = float(args.get("alpha_mult", 1))
_AC = M.AdapterConfig
M.AdapterConfig = lambda rank, alpha: _AC(rank=rank, alpha=alpha * amult)
cfg = dataclasses.replace(cfg, rank=int(args.get("rank", 8)), global_tokens=int(args.get("G", 8)))
orig_build = M.build_model
def build(cfg, method):
    m = orig_build(cfg, method); M._model = m; return m
M.build_model = build
r = M.run_mechanism(cfg, METHOD)  # builds through the patched build_model
print(json.dumps(dict(args=args, acc=r.accuracy, curve=r.curve)))
