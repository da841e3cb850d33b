"""PEFT's idiom (softprompt/runs/model.py): `sp.get_model(model, prompt)` wraps the base so that
transformers' `generate` and `forward` honour the prompt; save/load, the Hub (offline, against a
local folder), PEFT's trainable-parameters line; configs take and check PEFT's `task_type`."""

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from tiny_tokenizer import WORDS, tiny_tokenizer

import softprompt as sp
from softprompt import methods

TEXTS = [f"{WORDS[3]} {WORDS[7]} {WORDS[11]} {WORDS[20]}", f"{WORDS[5]} {WORDS[9]}"]
CONFIGS = [sp.PrefixTuningConfig(num_virtual_tokens=4, projection_dim=0, init="random"),
           sp.PromptTuningConfig(num_virtual_tokens=3, init="vocab"),
           sp.PTuningConfig(num_virtual_tokens=3)]


@pytest.fixture
def base():
    return tiny_model("llama"), tiny_tokenizer()


def strong(prompt):
    """A prompt whose effect on the tiny model is visible (a random prefix at the scale of real K/V)."""
    with torch.no_grad():
        for p in prompt.parameters():
            p.mul_(3.0)
    return prompt


def new_tokens(pm, tok, texts, **kw):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = pm.generate(**enc, **kw)
    assert out.shape[0] == len(texts) * kw.get("num_return_sequences", 1)
    assert torch.equal(out[:, :enc["input_ids"].shape[1]],
                       enc["input_ids"].repeat_interleave(kw.get("num_return_sequences", 1), 0))
    return out[:, enc["input_ids"].shape[1]:]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_generate_equals_sp_generate(base, config):
    model, tok = base
    prompt = strong(sp.create(model, config, tok))
    pm = sp.get_model(model, prompt, tok)
    new = new_tokens(pm, tok, TEXTS, max_new_tokens=8)
    ours = [tok.decode(row, skip_special_tokens=True) for row in new]
    assert ours == sp.generate(model, tok, TEXTS, prompt, max_new_tokens=8)
    bare = sp.generate(model, tok, TEXTS, None, max_new_tokens=8)
    assert ours != bare  # the prompt is honoured, not dropped


def test_generate_follows_transformers_conventions(base):
    model, tok = base
    pm = sp.get_model(model, strong(sp.create(model, CONFIGS[0], tok)), tok)
    enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    T = enc["input_ids"].shape[1]
    assert pm.generate(**enc, max_length=T + 3).shape[1] <= T + 3
    assert pm.generate(enc["input_ids"][:1]).shape[1] <= max(20, T)  # transformers' default max_length 20
    out = pm.generate(**enc, max_new_tokens=6, eos_token_id=int(pm.generate(**enc, max_new_tokens=1)[0, -1]),
                      pad_token_id=0)
    assert int(out[0, T]) != 0 and (out[0, T + 1:] == 0).all()  # a row that ended is padded after its end
    # sampling: torch's global generator, as in transformers; the same seed gives the same draw
    torch.manual_seed(3)
    a = pm.generate(**enc, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, num_return_sequences=2)
    torch.manual_seed(3)
    b = pm.generate(**enc, max_new_tokens=6, do_sample=True, temperature=1.5, top_k=0, num_return_sequences=2)
    assert torch.equal(a, b) and a.shape[0] == 4
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        pm.generate(**enc, no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="beam"):
        pm.generate(**enc, num_beams=3)
    right = {"input_ids": enc["input_ids"].flip(1), "attention_mask": enc["attention_mask"].flip(1)}
    with pytest.raises(ValueError, match="left"):
        pm.generate(**right)


def test_generate_sampling_equals_sp_generate(base):
    """do_sample=True draws as sp.generate's sampling does (one loop): same seed, same tokens."""
    model, tok = base
    prompt = strong(sp.create(model, CONFIGS[0], tok))
    pm = sp.get_model(model, prompt, tok)
    torch.manual_seed(11)
    new = new_tokens(pm, tok, TEXTS[:1], max_new_tokens=6, do_sample=True, temperature=0.8, top_k=10, top_p=0.9)
    torch.manual_seed(11)
    want = sp.generate(model, tok, TEXTS[:1], prompt, max_new_tokens=6, temperature=0.8, top_k=10, top_p=0.9)
    assert [tok.decode(new[0], skip_special_tokens=True)] == want


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.method)
def test_forward_is_the_prompts_forward(base, config):
    model, tok = base
    prompt = strong(sp.create(model, config, tok))
    pm = sp.get_model(model, prompt, tok)
    enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    out = pm(enc["input_ids"], enc["attention_mask"])
    want = prompt(model, enc["input_ids"], enc["attention_mask"]).logits
    assert out.logits.shape == (*enc["input_ids"].shape, model.config.vocab_size)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    # labels: transformers' shifted cross-entropy, -100 ignored; it trains the prompt
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    loss = pm(**enc, labels=labels).loss
    logits = want[:, :-1].reshape(-1, want.shape[-1])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1),
                                                                        ignore_index=-100))
    loss.backward()
    assert all(p.grad is not None for p in prompt.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="inputs_embeds"):
        pm(enc["input_ids"], inputs_embeds=torch.zeros(1))


def test_save_and_from_pretrained_round_trip(base, tmp_path):
    model, tok = base
    pm = sp.get_model(model, sp.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"), tok)
    strong(pm.prompt)
    path = pm.save_pretrained(tmp_path / "a")
    again = sp.PromptModel.from_pretrained(model, path, tok)
    assert torch.equal(again.prompt.to_kv_prefix(model), pm.prompt.to_kv_prefix(model))
    enc = tok(TEXTS, return_tensors="pt", padding=True, add_special_tokens=False)
    assert torch.equal(again.generate(**enc, max_new_tokens=5), pm.generate(**enc, max_new_tokens=5))
    assert again.get_nb_trainable_parameters()[0] == 0  # frozen, as PEFT loads for inference
    assert sp.PromptModel.from_pretrained(model, path, is_trainable=True).get_nb_trainable_parameters()[0] > 0
    # PEFT's format too, read back by the same call (and by PEFT: tests/test_peft_io.py)
    peft_dir = pm.save_pretrained(tmp_path / "peft", peft_format=True)
    assert json.loads((peft_dir / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert torch.allclose(sp.PromptModel.from_pretrained(model, peft_dir).prompt.to_kv_prefix(model),
                          pm.prompt.to_kv_prefix(model))
    # another base is refused, in one line
    with pytest.raises(ValueError, match="base model"):
        sp.PromptModel.from_pretrained(tiny_model("llama", seed=1), path)


def test_push_to_hub_and_back_offline(base, tmp_path, monkeypatch):
    """push_to_hub goes through huggingface_hub's HfApi; here a stand-in whose "Hub" is a local folder."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hub = tmp_path / "hub"
    calls = []

    class LocalHub:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **kw):
            calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
            (hub / repo_id).mkdir(parents=True, exist_ok=exist_ok)

        def upload_folder(self, *, repo_id, folder_path, commit_message=None, revision=None, repo_type=None, **kw):
            calls.append(("upload_folder", repo_id, commit_message, repo_type))
            for f in Path(folder_path).iterdir():
                (hub / repo_id / f.name).write_bytes(f.read_bytes())
            return "commit-info"

    def snapshot_download(repo_id, revision=None, token=None, **kw):
        calls.append(("snapshot_download", repo_id, revision))
        return str(hub / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    model, tok = base
    pm = sp.get_model(model, strong(sp.create(model, CONFIGS[1], tok)), tok)
    assert pm.push_to_hub("me/weather", private=True, token="t") == "commit-info"
    assert ("create_repo", "me/weather", True, True, "model") in calls and ("token", "t") in calls
    readme = (hub / "me/weather" / "README.md").read_text()
    assert "library_name: softprompt" in readme and "sp.PromptModel.from_pretrained" in readme
    again = sp.PromptModel.from_pretrained(model, "me/weather", tok, revision="main")
    assert ("snapshot_download", "me/weather", "main") in calls
    assert torch.equal(again.prompt.to_kv_prefix(model), pm.prompt.to_kv_prefix(model))


def test_a_hub_id_that_cannot_be_fetched_is_one_line(base, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")

    def offline(repo_id, **kw):
        raise OSError("offline mode is enabled\nmore")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    model, _ = base
    with pytest.raises(ValueError, match="no artifact at nobody/nothing.*offline mode is enabled$"):
        sp.PromptModel.from_pretrained(model, "nobody/nothing")


def test_print_trainable_parameters_is_peft_s_line(base, capsys):
    model, tok = base
    pm = sp.get_model(model, sp.PromptTuningConfig(num_virtual_tokens=3), tok)
    pm.print_trainable_parameters()
    trainable = 3 * model.config.hidden_size
    total = sum(p.numel() for p in model.parameters()) + trainable
    assert capsys.readouterr().out == (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                                       f"trainable%: {100 * trainable / total:.4f}\n")
    assert pm.get_nb_trainable_parameters() == (trainable, total)
    assert pm.config is model.config  # the base's attributes show through, as in PEFT


def test_print_trainable_parameters_matches_peft(base, capsys):
    """The same numbers PEFT prints for the same prompt-tuning setup."""
    peft = pytest.importorskip("peft")
    model, tok = base
    sp.get_model(model, sp.PromptTuningConfig(num_virtual_tokens=5), tok).print_trainable_parameters()
    ours = capsys.readouterr().out
    pm = peft.get_peft_model(tiny_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    pm.print_trainable_parameters()
    assert ours == capsys.readouterr().out


def test_task_type_is_accepted_and_checked(base):
    for cls in (sp.PrefixTuningConfig, sp.PromptTuningConfig, sp.PTuningConfig):
        assert cls(task_type="CAUSAL_LM").task_type == "CAUSAL_LM"
        assert cls().task_type is None
        with pytest.raises(ValueError, match="task_type must be one of CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS"):
            cls(task_type="TOKEN_CLS")
    peft = pytest.importorskip("peft")
    assert sp.PrefixTuningConfig(task_type=peft.TaskType.CAUSAL_LM).task_type == "CAUSAL_LM"
    # the run's flags, cards and run.json are built from the fields: task_type is not one of them
    from dataclasses import fields, replace

    assert "task_type" not in {f.name for c in methods.CONFIGS.values() for f in fields(c)}
    assert replace(sp.PrefixTuningConfig(task_type="CAUSAL_LM"), init="text").task_type == "CAUSAL_LM"
    model, tok = base
    assert sp.create(model, sp.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"), tok).method
    with pytest.raises(ValueError, match="task_type 'SEQ_2_SEQ_LM' does not fit this decoder-only model: use "
                                         "'CAUSAL_LM' or 'SEQ_CLS'"):
        sp.create(model, sp.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"), tok)


def test_export_peft_is_public(base, tmp_path):
    model, tok = base
    prompt = sp.create(model, CONFIGS[1], tok)
    path = sp.export_peft(prompt, tmp_path / "adapter", model)
    assert (path / "adapter_config.json").is_file()
    assert torch.equal(sp.load(path, model).to_kv_prefix(model), prompt.to_kv_prefix(model))
    assert {"get_model", "PromptModel", "export_peft"} <= set(sp.__all__)


def test_the_base_stays_frozen_in_eval_mode(base):
    model, tok = base
    pm = sp.get_model(model, CONFIGS[2], tok)
    assert pm.train() is pm and pm.prompt.training and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert "PromptModel(base=LlamaForCausalLM, method=p_tuning" in repr(pm)


def test_get_model_refuses_what_it_cannot_wrap(base):
    model, tok = base
    with pytest.raises(TypeError, match="expected a prompt"):
        sp.get_model(model, "prefix")
    with pytest.raises(ValueError, match="no artifact at runs/nothere"):
        sp.PromptModel.from_pretrained(model, "runs/nothere")


def test_repetition_penalty_and_min_new_tokens_as_transformers_applies_them(base):
    """With a prompt tuning prompt of the text's own embeddings, generation under the prompt is the
    base's generation over [prompt text + input]: transformers' own generate (its repetition-penalty
    and min-new-tokens processors) is the oracle, except that its penalty also counts the prompt's
    tokens, which ours cannot see (virtual tokens have no ids): so the prompt is one token whose id
    never comes up in either output."""
    model, tok = base
    lead = tok(WORDS[40], add_special_tokens=False)["input_ids"]
    prompt = sp.create(model, sp.PromptTuningConfig(num_virtual_tokens=len(lead), init="tokens",
                                                    init_tokens=tuple(lead)), tok)
    pm = sp.get_model(model, prompt, tok)
    enc = tok(TEXTS[:1], return_tensors="pt", add_special_tokens=False)
    ids = enc["input_ids"]
    full = torch.cat([torch.tensor([lead]), ids], 1)
    eos = int(model.generate(full, max_new_tokens=1, do_sample=False)[0, -1])  # the greedy first token as "EOS"
    for kw in (dict(repetition_penalty=1.8), dict(min_new_tokens=3, eos_token_id=eos), dict(repetition_penalty=0.6)):
        want = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=8, do_sample=False,
                              pad_token_id=0, **kw)[0, full.shape[1]:]
        got = pm.generate(**enc, max_new_tokens=8, pad_token_id=0, **kw)[0, ids.shape[1]:]
        assert lead[0] not in want.tolist()
        assert got.tolist() == want.tolist()[:len(got)] and len(got) == len(want), kw
