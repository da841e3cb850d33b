"""An independent, hand-written forward pass of a Llama-family decoder (Llama, Qwen2, Mistral, Qwen3)
with a KV prefix: RMSNorm, rotary positions, grouped-query attention and the SwiGLU MLP written
out from the papers, reading only the model's weights. No transformers code runs, so it stays a
reference whatever a release changes; it checks our prefixed passes on every installed version.
"""

from __future__ import annotations

import torch

SUPPORTED = ("llama", "qwen2", "mistral", "qwen3")


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos, theta):
    """x (B, H, T, D) rotated at positions pos (B, T), halves convention (rotate_half)."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    ang = pos.double()[..., None] * inv  # (B, T, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None].to(x.dtype), torch.cat([ang.sin()] * 2, -1)[:, None].to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _theta(cfg) -> float:
    theta = getattr(cfg, "rope_theta", None)
    if theta is None:
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


@torch.no_grad()
def logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefixes: list) -> torch.Tensor:
    """Logits (B, T, V) of a left-padded batch where row i carries prefixes[i] `(L, 2, H_kv, P_i, D)` or None.

    Row i's real tokens take positions P_i, P_i+1, ... and attend to its whole prefix, to earlier
    real tokens of their own row and to nothing else.
    """
    cfg = model.config
    assert cfg.model_type in SUPPORTED, cfg.model_type
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, T = input_ids.shape
    Hq, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // Hq
    eps, theta = cfg.rms_norm_eps, _theta(cfg)
    real = attention_mask.bool()
    P = [0 if p is None else p.shape[3] for p in prefixes]
    pos = (real.long().cumsum(-1) - 1).clamp(min=0) + torch.tensor(P)[:, None]  # (B, T)
    h = sd["model.embed_tokens.weight"][input_ids]  # (B, T, d)
    out_rows = []
    for i in range(B):  # one row at a time: nothing of another row can leak in
        x = h[i:i + 1, real[i]]  # (1, T_i, d)
        Ti = x.shape[1]
        for layer in range(cfg.num_hidden_layers):
            pre = f"model.layers.{layer}."
            a = _rms(x, sd[pre + "input_layernorm.weight"], eps)

            def proj(name, heads):
                y = a @ sd[pre + f"self_attn.{name}.weight"].T
                if pre + f"self_attn.{name}.bias" in sd:
                    y = y + sd[pre + f"self_attn.{name}.bias"]
                return y.view(1, Ti, heads, D).transpose(1, 2)  # (1, heads, T_i, D)

            q, k, v = proj("q_proj", Hq), proj("k_proj", Hkv), proj("v_proj", Hkv)
            if pre + "self_attn.q_norm.weight" in sd:  # Qwen3: RMSNorm per head before the rotation
                q, k = _rms(q, sd[pre + "self_attn.q_norm.weight"], eps), _rms(k, sd[pre + "self_attn.k_norm.weight"], eps)
            p_i = pos[i:i + 1, real[i]]
            q, k = _rope(q, p_i, theta), _rope(k, p_i, theta)
            if prefixes[i] is not None:
                kv = prefixes[i][layer].double()  # (2, H_kv, P, D): keys already rotated, as in a cache
                k, v = torch.cat([kv[0][None], k], 2), torch.cat([kv[1][None], v], 2)
            k, v = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)  # GQA
            S = k.shape[2]
            causal = torch.ones(Ti, S, dtype=torch.bool).tril(S - Ti)  # every query sees the whole prefix
            att = (q @ k.transpose(-1, -2)) / D ** 0.5
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            o = (att @ v).transpose(1, 2).reshape(1, Ti, Hq * D) @ sd[pre + "self_attn.o_proj.weight"].T
            x = x + o
            m = _rms(x, sd[pre + "post_attention_layernorm.weight"], eps)
            gate, up = m @ sd[pre + "mlp.gate_proj.weight"].T, m @ sd[pre + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ sd[pre + "mlp.down_proj.weight"].T
        x = _rms(x, sd["model.norm.weight"], eps)
        head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        row = torch.zeros(T, head.shape[0], dtype=torch.float64)
        row[real[i]] = (x @ head.T)[0]
        out_rows.append(row)
    return torch.stack(out_rows)  # (B, T, V), zeros at pad slots


def greedy(model, ids: list[int], prefix, n: int, eos: int = 2) -> list[int]:
    """Greedy tokens for one row by repeated full passes of the reference (no cache)."""
    out: list[int] = []
    for _ in range(n):
        x = torch.tensor([ids + out])
        nxt = int(logits(model, x, torch.ones_like(x), [prefix])[0, -1].argmax())
        out.append(nxt)
        if nxt == eos:
            break
    return out
