"""Encoder-decoder prompts (T5, BART) against PEFT and against independent computations."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DynamicCache,
    EncoderDecoderCache,
    T5Config,
    T5ForConditionalGeneration,
)

from softprompt import hf
from softprompt.families.seq2seq.core import Seq2SeqError, Seq2SeqPrefix, seq2seq_forward, seq2seq_geometry
from softprompt.families.seq2seq.generate import generate_ids
from softprompt.families.seq2seq.methods import create
from softprompt.families.seq2seq.train import Seq2SeqObjective
from softprompt.io.artifact import ArtifactError, load_artifact, read_card, save_artifact
from softprompt.loops.data import Example, TokenizedData
from softprompt.loops.generate import SamplingParams
from softprompt.loops.train import TrainConfig, Trainer

TOL = 1e-4
P = 5
SRC = [[5, 17, 33, 8, 41, 12, 9], [22, 7, 3], [60, 61, 62, 63, 64]]
DEC = [[0, 20, 21, 22], [0, 30, 31], [0, 40]]


def tiny(arch: str, layers: int = 2):
    torch.manual_seed(0)
    if arch == "t5":
        cfg = T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, num_layers=layers, d_ff=64,
                       decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0)
        model = T5ForConditionalGeneration(cfg)
    else:
        cfg = BartConfig(vocab_size=96, d_model=32, encoder_layers=layers, decoder_layers=layers,
                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                         max_position_embeddings=128, init_std=0.2, dropout=0.0)
        model = BartForConditionalGeneration(cfg)
    return model.float().eval().requires_grad_(False)


@pytest.fixture(params=["t5", "bart"])
def arch(request):
    return request.param


def padded(rows, pad=0, left=False):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = torch.tensor(r), 1
    return ids, mask


def peft_greedy(peft, ids, mask, start, n):
    """Greedy tokens by recomputing PEFT's full forward at every step (no cache: an exact oracle)."""
    dec = torch.tensor([[start]])
    for _ in range(n):
        logits = peft(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        dec = torch.cat([dec, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return dec[0, 1:].tolist()


# --------------------------------------------------------------------------------------------
# PEFT is the oracle where it has the method


def saved_peft(model, kind, tmp_path):
    """A PEFT SEQ_2_SEQ_LM adapter with non-trivial tensors, saved as safetensors, and the PEFT model."""
    cfg = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)
    peft = get_peft_model(model, cfg).eval()
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.normal_(0, 0.5 if kind == "prompt" else 1.0)
    peft.save_pretrained(tmp_path / kind, safe_serialization=True)
    return peft, tmp_path / kind


@pytest.mark.parametrize("kind,layers", [("prompt", 2), ("prefix", 2), ("prefix", 3)])
def test_imported_peft_adapter_matches_peft(arch, kind, layers, tmp_path):
    model = tiny(arch, layers)
    peft, path = saved_peft(model, kind, tmp_path)
    ours = load_artifact(path, model)
    prefix = ours.to_kv_prefix(model)
    assert ours.family == "seq2seq" and ours.card["model_family"] == "seq2seq"
    for i in range(len(SRC)):
        ids, dec = torch.tensor([SRC[i]]), torch.tensor([DEC[i]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            a = seq2seq_forward(model, [prefix], ids, mask, dec).logits
            b = peft(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            bare = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        assert (a - b).abs().max().item() < TOL
        assert (a - bare).abs().max().item() > 1e-2  # the prompt matters
        with torch.no_grad():
            want = peft_greedy(peft, ids, mask, model.config.decoder_start_token_id, 6)
        got = generate_ids(model, ids, mask, [prefix], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
        assert got == want


def test_trainable_forms_match_peft(arch):
    """Our prompt-tuning module and a PEFT model with the same tensors: same logits over a padded batch."""
    model = tiny(arch)
    ours = create("prompt", model, None, num_virtual_tokens=P, init="random")
    with torch.no_grad():
        ours.prompt_embeddings.normal_(0, 0.5)
    peft = get_peft_model(model, PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P)).eval()
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight[:P].copy_(ours.prompt_embeddings)
    ids, mask = padded(SRC)
    dec, dmask = padded(DEC)
    with torch.no_grad():
        a = ours(model, ids, mask, dec, dmask).logits
        b = peft(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dmask).logits
    keep = dmask.bool()
    assert (a[keep] - b[keep]).abs().max().item() < TOL


# --------------------------------------------------------------------------------------------
# Independent computations where PEFT has nothing: the encoder and cross-attention prefixes


def t5_encoder_ref(model, ids, kv):
    """T5 encoder written out by hand, every layer's self-attention over [prefix | tokens]; prefix
    slot j sits at position j, token i at P + i (relative bias). ids (1, S), kv (L, 2, H, P, D)."""
    enc, S, Pn = model.encoder, ids.shape[1], kv.shape[3]
    a0 = enc.block[0].layer[0].SelfAttention
    rel = torch.arange(Pn + S)[None, :] - (torch.arange(S)[:, None] + Pn)
    bucket = a0._relative_position_bucket(rel, bidirectional=True, num_buckets=a0.relative_attention_num_buckets,
                                          max_distance=a0.relative_attention_max_distance)
    bias = a0.relative_attention_bias(bucket).permute(2, 0, 1)[None]  # (1, H, S, P+S)
    h = model.shared(ids)
    for layer, blk in enumerate(enc.block):
        sa = blk.layer[0]
        at = sa.SelfAttention
        x = sa.layer_norm(h)
        heads = lambda t: t.view(1, S, at.n_heads, at.key_value_proj_dim).transpose(1, 2)  # noqa: E731
        k = torch.cat([kv[layer, 0][None], heads(at.k(x))], dim=2)
        v = torch.cat([kv[layer, 1][None], heads(at.v(x))], dim=2)
        w = (heads(at.q(x)) @ k.transpose(-1, -2) + bias).softmax(-1)  # T5: no 1/sqrt(d)
        h = h + at.o((w @ v).transpose(1, 2).reshape(1, S, -1))
        h = blk.layer[1](h)  # feed-forward with its residual
    return enc.final_layer_norm(h)


def bart_encoder_ref(model, ids, kv):
    """BART encoder by hand; tokens keep positions 0..S-1 (the prefix is keys/values only)."""
    enc, S = model.model.encoder, ids.shape[1]
    h = enc.embed_tokens(ids) + enc.embed_positions.weight[torch.arange(S) + 2][None]
    h = enc.layernorm_embedding(h)
    for layer, lay in enumerate(enc.layers):
        at = lay.self_attn
        heads = lambda t: t.view(1, S, at.num_heads, at.head_dim).transpose(1, 2)  # noqa: E731
        k = torch.cat([kv[layer, 0][None], heads(at.k_proj(h))], dim=2)
        v = torch.cat([kv[layer, 1][None], heads(at.v_proj(h))], dim=2)
        w = (heads(at.q_proj(h)) * at.scaling @ k.transpose(-1, -2)).softmax(-1)
        h = lay.self_attn_layer_norm(h + at.out_proj((w @ v).transpose(1, 2).reshape(1, S, -1)))
        h = lay.final_layer_norm(h + lay.fc2(lay.activation_fn(lay.fc1(h))))
    return h


def cross_attn_modules(model):
    dec = model.get_decoder()
    return [b.layer[1].EncDecAttention for b in dec.block] if hasattr(dec, "block") else [lay.encoder_attn for lay in dec.layers]


def test_all_three_prefixes_match_an_independent_computation(arch):
    """Encoder prefix: the hand-written encoder. Cross prefix: keys/values of Pc extra encoder
    states `extra` are exactly a cross prefix, so it equals decoding over [extra | encoder states].
    Decoder prefix: HF's own cache path (the one PEFT's oracle pins)."""
    model = tiny(arch)
    g = seq2seq_geometry(model)
    torch.manual_seed(1)
    enc_kv = torch.randn(g.part_shape("encoder", 4))
    dec_kv = torch.randn(g.part_shape("decoder", 3))
    extra = torch.randn(1, 6, g.hidden_size)
    cross = []
    for at in cross_attn_modules(model):
        kp, vp = (at.k, at.v) if hasattr(at, "k") else (at.k_proj, at.v_proj)
        cross.append(torch.stack([kp(extra), vp(extra)]).view(2, 6, g.num_heads, g.head_dim).transpose(1, 2))
    cross = torch.stack(cross)  # (L, 2, H, 6, D)
    prefix = Seq2SeqPrefix(encoder=enc_kv, decoder=dec_kv, cross=cross)
    ids, dec = torch.tensor([SRC[0]]), torch.tensor([DEC[0]])
    with torch.no_grad():
        ours = seq2seq_forward(model, [prefix], ids, torch.ones_like(ids), dec).logits
        hidden = (t5_encoder_ref if arch == "t5" else bart_encoder_ref)(model, ids, enc_kv)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for layer in range(dec_kv.shape[0]):
            cache.self_attention_cache.update(dec_kv[layer, 0][None], dec_kv[layer, 1][None], layer)
        states = torch.cat([extra, hidden], dim=1)
        ref = hf.call(model, cache, encoder_outputs=(states,), attention_mask=torch.ones(1, states.shape[1], dtype=torch.long),
                      decoder_input_ids=dec, decoder_attention_mask=torch.ones(1, 3 + dec.shape[1], dtype=torch.long)).logits
        no_enc = seq2seq_forward(model, [Seq2SeqPrefix(decoder=dec_kv, cross=cross)], ids, torch.ones_like(ids), dec).logits
    assert (ours - ref).abs().max().item() < TOL
    assert (ours - no_enc).abs().max().item() > 1e-2  # the encoder prefix matters


# --------------------------------------------------------------------------------------------
# Padding and mixed batches


def test_mixed_batch_rows_equal_rows_alone(arch):
    """Rows with different prefixes (lengths 5, 3, none; all parts) and source lengths, padded on
    the left or the right: each row's logits and greedy tokens equal running it alone."""
    model = tiny(arch)
    g = seq2seq_geometry(model)
    torch.manual_seed(2)
    full = lambda n: Seq2SeqPrefix(embeds=torch.randn(n, g.hidden_size) * 0.5, **{  # noqa: E731
        p: torch.randn(g.part_shape(p, n)) for p in ("encoder", "decoder", "cross")})
    prefixes = [full(5), full(3), None]
    dec, dmask = padded(DEC)
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    for left in (False, True):
        ids, mask = padded(SRC, left=left)
        with torch.no_grad():
            batch = seq2seq_forward(model, prefixes, ids, mask, dec, dmask).logits
        toks = generate_ids(model, ids, mask, prefixes, params)
        for i in range(3):
            one = torch.tensor([SRC[i]])
            with torch.no_grad():
                alone = seq2seq_forward(model, [prefixes[i]], one, torch.ones_like(one), torch.tensor([DEC[i]])).logits
            n = len(DEC[i])
            assert (batch[i, :n] - alone[0]).abs().max().item() < TOL
            assert toks[i] == generate_ids(model, one, torch.ones_like(one), [prefixes[i]], params)[0]


def test_bad_input_errors(arch):
    model = tiny(arch)
    ids, mask = padded(SRC)
    with pytest.raises(Seq2SeqError, match="2 prefixes for 3 rows"):
        seq2seq_forward(model, [None, None], ids, mask, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="parts"):
        create("prefix", model, None, num_virtual_tokens=2, parts=("encoder", "nowhere"))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        create("prefix", model, None, num_virtual_tokens=0)
    with pytest.raises(Seq2SeqError, match="not available"):
        create("p_tuning", model, None, num_virtual_tokens=2)
    from conftest import tiny_model

    with pytest.raises(Seq2SeqError, match="not an encoder-decoder"):
        create("prefix", tiny_model("llama"), None, num_virtual_tokens=2)


# --------------------------------------------------------------------------------------------
# Artifacts: the card records the family; the wrong family is refused


def test_artifact_round_trip_and_family_refusals(arch, tmp_path):
    from conftest import tiny_model

    model = tiny(arch)
    prompt = create("prefix", model, None, num_virtual_tokens=3, projection_dim=8)
    path = save_artifact(prompt, tmp_path / "a", model)
    card = read_card(path)
    assert card["model_family"] == "seq2seq" and card["config"]["parts"] == ["encoder", "decoder", "cross"]
    back = load_artifact(path, model)
    ids, dec = torch.tensor([SRC[0]]), torch.tensor([DEC[0]])
    with torch.no_grad():
        a = seq2seq_forward(model, [prompt.to_kv_prefix(model)], ids, torch.ones_like(ids), dec).logits
        b = seq2seq_forward(model, [back.to_kv_prefix(model)], ids, torch.ones_like(ids), dec).logits
    assert (a - b).abs().max().item() < 1e-6
    decoder_only = tiny_model("llama")
    with pytest.raises(ArtifactError, match="seq2seq model .* is causal_lm"):
        load_artifact(path, decoder_only)
    from softprompt import methods

    causal = save_artifact(methods.create("prefix", decoder_only, None, num_virtual_tokens=2, projection_dim=0),
                           tmp_path / "c", decoder_only)
    with pytest.raises(ArtifactError, match="causal_lm model .* is seq2seq"):
        load_artifact(causal, model)


def test_peft_seq2seq_adapter_refused_on_a_decoder(tmp_path):
    from conftest import tiny_model

    _, path = saved_peft(tiny("t5"), "prefix", tmp_path)
    with pytest.raises(ValueError, match="encoder-decoder"):
        load_artifact(path, tiny_model("llama"))
    assert json.loads((path / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"


# --------------------------------------------------------------------------------------------
# Training with the one loop


def toy_data():
    """Copy-a-word task: the target is a fixed function of the source."""
    rows, n = [], []
    for a in range(10, 40, 3):
        src, tgt = [a, a + 1, a + 2, 1], [a + 40, 1]
        rows.append(src + tgt)
        n.append(len(tgt))
    return TokenizedData(rows, n, [Example("s", "t")] * len(rows))


@pytest.mark.parametrize("method,opts,lr", [("prefix", dict(projection_dim=16), 3e-2), ("prompt", dict(init="vocab"), 1.0)])
def test_loss_falls_and_checkpointing_gives_the_same_run(arch, method, opts, lr):
    model = tiny(arch)
    data = toy_data()
    losses = []
    for gc in (False, True):
        prompt = create(method, model, None, num_virtual_tokens=4, **opts)
        cfg = TrainConfig(steps=30, batch_size=5, lr=lr, schedule="constant", gradient_checkpointing=gc, checkpoint_every=0)
        result = Trainer(model, None, prompt, data, cfg, objective=Seq2SeqObjective()).run()
        losses.append([r["loss"] for r in result.history])
    first, last = sum(losses[0][:5]) / 5, sum(losses[0][-5:]) / 5
    assert last < 0.85 * first  # a frozen random model: prompt tuning alone plateaus early, prefixes go further
    # the recompute sees the same prefix: equal losses (gradient sums may round differently, and
    # lr 1.0 amplifies that over the run, so later steps only agree closely)
    assert losses[0][:4] == pytest.approx(losses[1][:4], rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)


def test_objective_loss_is_teacher_forced_cross_entropy(arch):
    model = tiny(arch)
    data = toy_data()
    prompt = create("prefix", model, None, num_virtual_tokens=2, projection_dim=0)
    loss, n = Seq2SeqObjective().loss(prompt, model, data, [0, 1], 0, "cpu")
    pre = prompt.to_kv_prefix(model)
    total = 0.0
    for i in (0, 1):
        src, tgt = data.ids[i][:-2], data.ids[i][-2:]
        dec = torch.tensor([[model.config.decoder_start_token_id] + tgt[:-1]])
        with torch.no_grad():
            logits = seq2seq_forward(model, [pre], torch.tensor([src]), torch.ones(1, len(src), dtype=torch.long), dec).logits
        total += F.cross_entropy(logits[0], torch.tensor(tgt), reduction="sum").item()
    assert n == 4 and float(loss) == pytest.approx(total, rel=1e-5)


# --------------------------------------------------------------------------------------------
# The command line with a T5 base directory


@torch.no_grad()
def greedy_by_hand(model, tok, text, prefix, n):
    """Greedy decoding as argmax over the full decoder input each step (no cache), stopping at eos."""
    ids = torch.tensor([tok(text)["input_ids"]])
    dec = [model.config.decoder_start_token_id]
    for _ in range(n):
        t = int(seq2seq_forward(model, [prefix], ids, torch.ones_like(ids), torch.tensor([dec])).logits[0, -1].argmax())
        if t == model.config.eos_token_id:
            break
        dec.append(t)
    return tok.decode(dec[1:], skip_special_tokens=True)


def test_cli_train_generate_eval_on_a_t5_directory(tmp_path, capsys):
    from tiny_tokenizer import WORDS, tiny_tokenizer

    from softprompt.cli import main
    from softprompt.io.load import load_base

    base = tmp_path / "t5"
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=96, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=64,
                                        decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    model, tok = load_base(base)
    assert model.config.is_encoder_decoder and tok.padding_side == "right"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"{WORDS[i]} {WORDS[i + 1]}", "output": WORDS[i + 40]}) + "\n"
                            for i in range(0, 30, 3)))
    out = tmp_path / "run"
    assert main(["train", str(data), str(out), "--base", str(base), "--method", "prefix", "--steps", "3",
                 "--batch-size", "4", "--num-virtual-tokens", "3", "--projection-dim", "8"]) == 0
    assert read_card(out / "best")["model_family"] == "seq2seq"
    capsys.readouterr()
    assert main(["generate", f"{WORDS[6]} {WORDS[7]}", "--adapter", str(out / "best"), "--base", str(base),
                 "--max-new-tokens", "3"]) == 0
    # the printed continuation is greedy decoding recomputed here without a cache (the full decoder
    # input each step), under the saved prefix; the bare base continues differently, so the prefix counts
    prefix = load_artifact(out / "best", model).to_kv_prefix(model)
    want = greedy_by_hand(model, tok, f"{WORDS[6]} {WORDS[7]}", prefix, 3)  # most inputs end at once: not this one
    assert want and want != greedy_by_hand(model, tok, f"{WORDS[6]} {WORDS[7]}", None, 3)
    assert capsys.readouterr().out == want + "\n"
    assert main(["eval", "--adapter", str(out / "best"), "--data", str(data), "--base", str(base),
                 "--max-new-tokens", "3", "--json"]) == 0
    assert "bleu" in capsys.readouterr().out


def test_cli_eval_refuses_beams_on_an_encoder_decoder(tmp_path, capsys):
    """`eval --num-beams 4` on a T5 base once decoded greedily and printed "beam 4"; now it refuses
    in one line (exit 2) before any decoding."""
    from tiny_tokenizer import WORDS, tiny_tokenizer

    from softprompt.cli import main

    base = tmp_path / "t5"
    model = tiny("t5")
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    art = save_artifact(create("prefix_tuning", model, num_virtual_tokens=2, init="random"), tmp_path / "p", model)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"input": f"{WORDS[0]} {WORDS[1]}", "output": WORDS[2]}) + "\n")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(art), "--data", str(data), "--base", str(base), "--num-beams", "4"]) == 2
    err = capsys.readouterr().err
    assert "beam search (num_beams=4) is not implemented for encoder-decoder" in err and len(err.strip().splitlines()) == 1
