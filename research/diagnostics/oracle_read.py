"""One-off: is the READ learnable on a model? The state is replaced by a fixed random G x r matrix per value."""
import json, sys, torch
import pte.mechanism as M
from pte.adapters import PTEAdapter
from pte.config import PTEConfig
from pte.state import normalize_rows
torch.set_num_threads(1)
args = dict(a.split("=") for a in sys.argv[1:])
cfg = M.MechanismConfig(model=args.get("model", "random:llama-tiny-wide"), distractors=True, fillers=16, lead=8,
                        steps=int(args.get("steps", 60)), batch_size=int(args.get("bs", 16)), eval_rows=128)
LABEL = {}
_rb = M.recall_batch
def rb(c, rows, gen):
    p, t = _rb(c, rows, gen); LABEL["v"] = t[:, -1] - 65; return p, t
M.recall_batch = rb
ORACLE = {}
def layer_state(self, i):
    if not self.bank.enabled: return None
    if "S" not in ORACLE:  # one fixed random state per value and layer
        shape = (self._model.config.num_hidden_layers, 8, cfg.global_tokens, cfg.rank)
        ORACLE["S"] = normalize_rows(torch.randn(shape, generator=torch.Generator().manual_seed(9)), 1e-6)
    return ORACLE["S"][i, LABEL["v"]]
PTEAdapter.layer_state = layer_state
r = M.run_mechanism(cfg, "pte_no_global")
print(json.dumps(dict(args=args, acc=r.accuracy, curve=r.curve)))
