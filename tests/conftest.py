"""Tiny randomly initialized decoders (Llama with GQA, GPT-2, Qwen2; and every common family in
`FAMILIES`) for exact CPU tests."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


def tiny_model(arch: str, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = Qwen2ForCausalLM(cfg)
    elif arch in FAMILY_CONFIGS:
        import transformers

        cfg_name, model_name, opts = FAMILY_CONFIGS[arch]
        common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = getattr(transformers, model_name)(getattr(transformers, cfg_name)(**common, **opts))
    else:
        raise ValueError(arch)
    model.float().eval().requires_grad_(False)
    return model


ARCHS = ["llama", "gpt2", "qwen2"]

# The other common decoder families, tiny: (config class, model class, options). What each brings:
# OPT learned positions with an offset of 2; Mistral a sliding window; Qwen3 q/k norms; Gemma 2
# logit soft-capping, alternating sliding layers and a query scale of its own; Gemma 3 q/k norms
# and local/global RoPE; Phi-3 fused QKV; GPT-NeoX fused QKV and partial rotary.
_DEC = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256)
FAMILY_CONFIGS = {
    "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=48, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=256, word_embed_proj_dim=48)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_DEC, sliding_window=64)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DEC, head_dim=16, sliding_window=64, query_pre_attn_scalar=16,
                                                          attn_logit_softcapping=50.0, final_logit_softcapping=30.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DEC, head_dim=16, sliding_window=64,
                                                              query_pre_attn_scalar=16)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DEC, original_max_position_embeddings=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4, max_position_embeddings=256,
                                                             rotary_pct=0.5)),
}
FAMILIES = ARCHS + list(FAMILY_CONFIGS)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model(arch):
    return tiny_model(arch)


def left_padded(rows: list[list[int]], pad: int = 0):
    """(input_ids, attention_mask) for rows of different lengths, padded on the left."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


ROWS = [[5, 17, 33, 8, 41, 12, 9], [22, 7, 3], [60, 61, 62, 63, 64]]


@pytest.fixture
def embedded_stand_in(tmp_path, monkeypatch):
    """A tiny Llama with a word tokenizer on disk that `softprompt.load_base()` returns in place of
    the embedded model (for running user-facing examples as written). Returns its directory."""
    from tiny_tokenizer import tiny_tokenizer

    import softprompt as sp

    d = tmp_path / "base"
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    real = sp.load_base
    monkeypatch.setattr(sp, "load_base", lambda path=None, **kw: real(d if path is None else path, **kw))
    return d


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a base model directory (for the CLI's --base)."""
    from tiny_tokenizer import tiny_tokenizer

    d = tmp_path_factory.mktemp("base")
    tiny_model("llama").save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def llama():
    """A tiny llama with its fingerprint cached before any test forks (children do not recompute it)."""
    from softprompt.core.geometry import model_fingerprint

    model = tiny_model("llama")
    model_fingerprint(model)
    return model


@pytest.fixture(scope="module")
def pg():
    """A real PostgreSQL server for the module's tests (tests/services.py), stopped after them."""
    from services import Postgres

    server = Postgres()
    yield server
    server.close()
