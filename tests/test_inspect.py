"""Inspection (nearest tokens, norms, attention shares, the PNG) and model cards, on tiny models."""

import json

import pytest
import torch
from conftest import ROWS, left_padded, tiny_model
from tiny_tokenizer import tiny_tokenizer, word_id

from softprompt import methods
from softprompt.io.artifact import save_artifact
from softprompt.io.card import model_card
from softprompt.runs.inspect import attention_share, inspect_prompt, nearest_tokens, plot, run_inspect, summary


def test_text_init_nearest_token_is_itself():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=3, init="text", init_text="po")
    near = nearest_tokens(prompt, model, tok, k=3)
    for row in near:
        assert row["nearest"][0]["id"] == word_id("po")
        assert row["nearest"][0]["token"] == "po"
        assert row["nearest"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
        assert row["nearest"][1]["cosine"] < 0.999
    # its norm is exactly the vocabulary row's, so it sits inside the vocabulary's norm range
    assert near[0]["norm"] == pytest.approx(float(model.get_input_embeddings().weight[word_id("po")].norm()), rel=1e-6)
    assert 0 <= near[0]["norm_percentile"] <= 100
    # P-tuning: its encoder's output is inspected the same way
    pt = methods.create("p_tuning", model, tok, num_virtual_tokens=3)
    assert [len(r["nearest"]) for r in nearest_tokens(pt, model, tok, k=2)] == [2, 2, 2]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_attention_shares_sum_to_one_and_ignore_padding(arch, method):
    model, tok = tiny_model(arch), tiny_tokenizer()
    impl = model.config._attn_implementation
    prompt = methods.create(method, model, tok, num_virtual_tokens=4, seed=1)
    kv = prompt.to_kv_prefix(model)
    ids, mask = left_padded(ROWS)
    share = attention_share(model, kv, ids, mask)
    L, Hq = model.config.num_hidden_layers, model.config.num_attention_heads
    pre, real = torch.tensor(share["prefix"]), torch.tensor(share["real"])
    assert pre.shape == real.shape == (L, Hq)
    assert torch.allclose(pre + real, torch.ones(L, Hq, dtype=pre.dtype), atol=1e-5)
    assert (pre > 0).all() and (pre < 1).all()
    assert share["num_query_tokens"] == int(mask.sum())
    # Padding changes nothing: the batch's share is the token-weighted mean of each row's share run
    # alone, unpadded (attention leaking onto pad slots, or pad queries counted, would move it).
    alone = [(len(r), attention_share(model, kv, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long)))
             for r in ROWS]
    want = sum(n * torch.tensor(a["prefix"]) for n, a in alone) / sum(n for n, _ in alone)
    torch.testing.assert_close(pre, want.to(pre.dtype), atol=1e-5, rtol=0)
    assert model.config._attn_implementation == impl  # restored


@torch.no_grad()
def shares_by_hand(model, kv, ids, mask):
    """The prefix's and the real tokens' attention shares (L, Hq) recomputed from the tiny llama's
    weights: per layer, RMSNorm of the layer's input, q/k projections, RoPE at positions P, P+1, ...
    counted over real tokens only (rotate-half convention, theta from the config), scores
    q.k / sqrt(D) over [the P prefix keys (stored rotated, as in a cache), the real keys at or
    before the query]: padding is never a column. Averaged over real query tokens.
    Only the layer inputs come from the model (its hidden states), never its attention weights."""
    from softprompt.hf.prefix import prefixed_forward

    cfg = model.config
    L, Hq, Hkv, D = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    theta = cfg.rope_parameters["rope_theta"]
    P = kv.shape[3]
    hidden = prefixed_forward(model, ids, mask, [kv], use_cache=True, output_hidden_states=True).hidden_states
    inv_freq = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D)

    def rope(x, pos):  # x (H, T, D), pos (T,)
        ang = pos.double()[:, None] * inv_freq[None]  # (T, D/2)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = torch.cat([-x[..., D // 2:], x[..., :D // 2]], -1)
        return x * cos + rot * sin

    pre, real = torch.zeros(L, Hq, dtype=torch.float64), torch.zeros(L, Hq, dtype=torch.float64)
    n = 0
    for b in range(ids.shape[0]):
        keep = mask[b].bool()
        T = int(keep.sum())
        pos = P + torch.arange(T)
        n += T
        for layer in range(L):
            blk = model.model.layers[layer]
            x = hidden[layer][b, keep].double()  # (T, d): real tokens only
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * blk.input_layernorm.weight.double()
            q = rope((x @ blk.self_attn.q_proj.weight.double().T).view(T, Hq, D).transpose(0, 1), pos)
            k = rope((x @ blk.self_attn.k_proj.weight.double().T).view(T, Hkv, D).transpose(0, 1), pos)
            k = torch.cat([kv[layer, 0].double(), k], 1).repeat_interleave(Hq // Hkv, 0)  # (Hq, P + T, D)
            scores = q @ k.transpose(1, 2) / D ** 0.5  # (Hq, T, P + T)
            causal = torch.ones(T, T).tril().bool()
            scores[:, :, P:] = scores[:, :, P:].masked_fill(~causal, float("-inf"))
            att = scores.softmax(-1)
            pre[layer] += att[..., :P].sum(-1).sum(-1)
            real[layer] += att[..., P:].sum(-1).sum(-1)
    return pre / n, real / n


@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning"])
def test_attention_share_matches_a_hand_computation(method):
    """Every layer and head of a left-padded batch against softmax(QK^T/sqrt(D) + mask) computed here."""
    model = tiny_model("llama")
    prompt = methods.create(method, model, num_virtual_tokens=3, seed=2,
                            **({"projection_dim": 0} if method == "prefix_tuning" else {}))
    kv = prompt.to_kv_prefix(model)
    with torch.no_grad():
        kv = kv * 4  # a prefix that draws a sizeable share, so a mistake moves it visibly
    ids, mask = left_padded(ROWS)
    share = attention_share(model, kv, ids, mask)
    pre, real = shares_by_hand(model, kv, ids, mask)
    assert share["num_query_tokens"] == int(mask.sum()) == 15
    assert 0.05 < float(pre.min()) and float(pre.max()) < 0.95  # not a degenerate 0 or 1
    torch.testing.assert_close(torch.tensor(share["prefix"], dtype=torch.float64), pre, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(share["real"], dtype=torch.float64), real, atol=1e-5, rtol=0)


def test_inspect_report_png_and_summary(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = methods.create("prefix_tuning", model, tok, num_virtual_tokens=4, projection_dim=0)
    art = save_artifact(prompt, tmp_path / "pre", model)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": "ba be bi", "output": "bo bu"}) + "\n" for _ in range(3)))
    report, jpath, ppath = run_inspect(str(art), model, tok, data=str(data), examples=2)
    assert json.loads(jpath.read_text())["method"] == "prefix_tuning"
    assert ppath.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(report["kv_norms"]["key"]) == 2
    text = summary(report)
    assert "prefix share" in text and "layer" in text
    # prompt tuning without data: nearest tokens in the summary, norms panel only in the PNG
    pt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=2, init="text", init_text="po ka")
    rep = inspect_prompt(pt, model, tok)
    assert "'po' 1.00" in summary(rep) and "'ka' 1.00" in summary(rep)
    assert plot(rep, tmp_path / "p.png").stat().st_size > 1000


def test_cli_inspect_and_card(tmp_path, capsys, monkeypatch):
    from softprompt import cli

    model, tok = tiny_model("llama"), tiny_tokenizer()
    monkeypatch.setattr(cli, "_load", lambda base, lora=None, merge_lora=True: (model, tok))
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=2, init="text", init_text="po")
    art = save_artifact(prompt, tmp_path / "pt.safetensors", model, metrics={"bleu": 12.5}, dataset="demo.jsonl")
    assert cli.main(["inspect", str(art), "--out", str(tmp_path / "ins")]) == 0
    out = capsys.readouterr().out
    assert "'po' 1.00" in out
    assert (tmp_path / "ins.json").is_file() and (tmp_path / "ins.png").is_file()
    assert cli.main(["card", str(art)]) == 0
    md = capsys.readouterr().out
    for want in ("# pt", "fingerprint", "sha256:", "prompt_tuning", "| artifact bytes (tensors) | `384` |", "bleu",
                 "12.5", "demo.jsonl", "0.1.0", "## Use"):
        assert want in md, want
    assert cli.main(["card", str(art), "--out", str(tmp_path / "card.md")]) == 0
    assert (tmp_path / "card.md").read_text().rstrip("\n") == md.rstrip("\n")
    assert cli.main(["card", str(tmp_path / "nothing")]) == 2


def test_card_of_a_training_run(tmp_path):
    from softprompt.runs.config import RunConfig
    from softprompt.runs.train import run_train

    model, tok = tiny_model("llama"), tiny_tokenizer()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": "ba be", "output": "bo"}) + "\n" for _ in range(4)))
    run_train(RunConfig.of(train_data=str(data), out=str(tmp_path / "run"), method="prompt_tuning",
                           num_virtual_tokens=2, steps=2, batch_size=2, checkpoint_every=0, progress=False), model, tok)
    md = model_card(tmp_path / "run" / "best")
    assert "# run/best" in md and "## Training hyperparameters" in md and "| lr |" in md and "d.jsonl" in md


def test_card_names_the_runs_training_data_from_run_json(tmp_path):
    """A card without its own dataset line takes it from run.json: `train_data` (what runs write),
    or `data_path` for runs written before that name."""
    model = tiny_model("llama")
    save_artifact(methods.create("prompt_tuning", model, None, num_virtual_tokens=2), tmp_path / "run" / "best", model)
    for run in ({"train_data": "new.jsonl"}, {"data_path": "old.jsonl"},
                {"train_data": None, "data_path": "old.jsonl"}):
        (tmp_path / "run" / "run.json").write_text(json.dumps(run))
        want = run.get("train_data") or run["data_path"]
        assert f"- dataset: `{want}`" in model_card(tmp_path / "run" / "best"), run


@pytest.mark.embedded
def test_embedded_positive_is_its_own_nearest_token():
    from softprompt.io.load import load_base

    model, tok = load_base()
    prompt = methods.create("prompt_tuning", model, tok, num_virtual_tokens=4, init="text", init_text="positive")
    ids = tok("positive", add_special_tokens=False)["input_ids"]
    near = nearest_tokens(prompt, model, tok, k=2)
    assert near[0]["nearest"][0]["id"] == ids[0]
    assert near[0]["nearest"][0]["token"] == tok.decode(ids[:1])
