"""Tiny randomly initialized decoders (Llama with GQA, GPT-2, Qwen2) for exact CPU tests."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


def tiny_model(arch: str, seed: int = 0):
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

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
    else:
        raise ValueError(arch)
    model.float().eval().requires_grad_(False)
    return model


ARCHS = ["llama", "gpt2", "qwen2"]


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
