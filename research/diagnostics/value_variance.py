"""Fraction of the state's variance explained by the recalled value at init (demo vs tiny, centred or not)."""
import sys, torch
from common import thinking_kv
from pte.mechanism import MechanismConfig, build_model
from pte.adapters import find_pte
from pte.state import normalize_rows, context_mix
from pte.config import PTEConfig
torch.set_num_threads(1)
model_path = sys.argv[1]
cfg = MechanismConfig(model=model_path, distractors=True, fillers=16, lead=8, pte=PTEConfig(write_context=2))
model = build_model(cfg, "pte_no_global")
enc = find_pte(model).encoder
n_ev = cfg.lead + 2 + cfg.fillers  # thinking tokens evicted before SEP (pair mid-thought)
t, K, V = thinking_kv(model, cfg, 256, 5)
K, V = K[:, :, :n_ev], V[:, :, :n_ev]  # [L, B, n, d]
with torch.no_grad():
    qa, _ = enc.project_globals(find_pte(model)._layers())
    label = t[:, cfg.lead + 1]
    def frac(S):  # S [L, B, G, r] -> between-class variance fraction per layer
        x = S.flatten(2)
        tot = (x - x.mean(1, keepdim=True)).pow(2).sum((1, 2))
        means = torch.stack([x[:, label == c].mean(1) for c in label.unique()], 1)  # [L, C, F]
        cnt = torch.stack([(label == c).sum() for c in label.unique()]).float()
        between = ((means - x.mean(1, keepdim=True)).pow(2).sum(-1) * cnt).sum(1)
        return between / tot
    for name, (k, v) in {"raw": (K, V), "centred": (K - K.mean((1, 2), keepdim=True), V - V.mean((1, 2), keepdim=True))}.items():
        for mix in ("ident", "box"):
            if mix == "box":
                kern = torch.ones(K.shape[0], 2, K.shape[-1])
                z = torch.zeros(K.shape[0], K.shape[1], 1, K.shape[-1])
                km, vm = context_mix(k, z, kern), context_mix(v, z, kern)
            else:
                km, vm = k, v
            ke, ve = km @ enc.wa_k.unsqueeze(1), vm @ enc.wa_v.unsqueeze(1)
            S = normalize_rows(qa.unsqueeze(1) @ (ke.transpose(-1, -2) @ ve), 1e-6)
            f = frac(S)
            print(f"{model_path:24s} {name:8s} {mix:5s} value-explained variance: mean {f.mean():.3f} max {f.max():.3f} (layer {int(f.argmax())})")
