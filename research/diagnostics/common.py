"""What the one-off diagnostics share: a model's cached keys and values on mechanism rows, as the state sees them."""
import torch

from pte.mechanism import MechanismConfig, recall_batch
from pte.state import flatten_heads, unrotate_keys


@torch.no_grad()
def thinking_kv(model, cfg: MechanismConfig, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One cached forward of ``rows`` mechanism rows (``recall_batch`` seeded with ``seed``).

    Returns ``tokens [B, T]`` (the thinking tokens) and their pre-RoPE keys and values, heads flattened as the write
    takes them: ``[L, B, T, d_kv]`` each (the prompt's BOS dropped).
    """
    prompt, tokens = recall_batch(cfg, rows, torch.Generator().manual_seed(seed))
    ids = torch.cat([prompt, tokens], 1)
    layers = model(ids, use_cache=True).past_key_values.layers
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    cos, sin = model.get_decoder().rotary_emb(layers[0].keys, pos)
    keys = torch.stack([flatten_heads(unrotate_keys(layer.keys, cos, sin))[:, 1:] for layer in layers])
    values = torch.stack([flatten_heads(layer.values)[:, 1:] for layer in layers])
    return tokens, keys, values
