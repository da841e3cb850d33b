"""Classification: deep prompts on a tiny random BERT (PEFT's P-tuning v2 prefix as the oracle),
padding invariance, the verbalizer's multi-token scores against a direct computation, training
through the one loop, artifact round trips and refusals, and POST /v1/classify."""

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded, tiny_model
from tiny_tokenizer import tiny_tokenizer, word_id

from softprompt import hf, methods
from softprompt.classify import (
    ClassificationData,
    ClassificationObjective,
    EncoderClassifier,
    VerbalizerClassifier,
    accuracy_f1,
    predict,
)
from softprompt.core.geometry import geometry
from softprompt.families.encoder import encode, pool
from softprompt.io.artifact import ArtifactError, load_artifact, save_artifact
from softprompt.io.classifier import load_classifier
from softprompt.loops.train import TrainConfig, Trainer, TrainerOutput
from softprompt.methods import PrefixTuning, PromptTuning


def tiny_bert(seed=0, num_labels=None):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=128, pad_token_id=0, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, **({"num_labels": num_labels} if num_labels else {}))
    m = BertForSequenceClassification(cfg) if num_labels else BertModel(cfg, add_pooling_layer=False)
    return m.float().eval().requires_grad_(False)


def right_padded(rows, pad=0):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids, mask


ROWS = [[5, 9, 14, 22, 30, 7], [5, 40, 41], [5, 60, 61, 62, 63]]


@pytest.mark.parametrize("shift", [True, False])
def test_deep_prompt_matches_peft_p_tuning_v2_on_bert(shift):
    """PEFT's prefix tuning for SEQ_CLS (P-tuning v2) on BertForSequenceClassification: same prefix and
    tokens in, same logits out, with padding in the batch. PEFT shifts real tokens to positions P, P+1...;
    our default keeps the encoder's own positions (PEFT ignores position_ids: its prompt through BERT then)."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    bert = tiny_bert(num_labels=3)
    pm = get_peft_model(bert, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for p in pm.prompt_encoder.parameters():
            p.normal_()
        kv = hf.to_prefix(pm.get_prompt(1))  # (L, 2, H, P, D)
        ids, mask = right_padded(ROWS)
        if shift:
            try:
                want = pm(input_ids=ids, attention_mask=mask).logits
            except ValueError as e:  # PEFT 0.21.2 under transformers 5.24 no longer sees BERT's cache keyword
                import peft
                import transformers

                pytest.skip(f"PEFT {peft.__version__} refuses BERT prefix tuning under transformers "
                            f"{transformers.__version__}: {e}")
        else:  # PEFT drops position_ids: its prompt cache through transformers' own path, positions 0, 1, ...
            full = torch.cat([torch.ones(len(ids), 4, dtype=torch.long), mask], 1)
            want = hf.call(bert, pm.get_prompt(len(ids)), input_ids=ids, attention_mask=full,
                           position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
        h = encode(bert.bert, ids, mask, prefix=kv, shift_positions=shift)
        got = bert.classifier(bert.bert.pooler(h))
    assert kv.shape == geometry(bert).prefix_shape(4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    bare = bert.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (h - bare).abs().max() > 1e-2  # the prefix matters


@pytest.mark.parametrize("kind", ["prefix", "prompt", "head"])
def test_padding_does_not_change_a_rows_prediction(kind):
    bert = tiny_bert()
    g = torch.Generator().manual_seed(1)
    geo = geometry(bert)
    if kind == "prefix":
        prompt = PrefixTuning(geo, 3, 0, torch.randn(geo.prefix_shape(3), generator=g))
    elif kind == "prompt":
        prompt = PromptTuning(geo, torch.randn(3, geo.hidden_size, generator=g))
    else:
        prompt = None
    clf = EncoderClassifier(prompt, geo.hidden_size, ["a", "b", "c"], "mean").eval()
    with torch.no_grad():
        ids, mask = right_padded(ROWS)
        batch = clf(bert, ids, mask)
        for i, r in enumerate(ROWS):
            alone = clf(bert, torch.tensor([r]), torch.ones(1, len(r), dtype=torch.long))
            torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=0)


def test_head_only_is_the_bare_encoder_pooled():
    bert = tiny_bert()
    clf = EncoderClassifier(None, 32, ["x", "y"], "cls").eval()
    ids, mask = right_padded(ROWS)
    with torch.no_grad():
        h = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(clf(bert, ids, mask), clf.head(h[:, 0]))
        torch.testing.assert_close(pool(h, mask, "mean")[1], h[1, :3].mean(0))


def test_verbalizer_scores_multi_token_label_words_like_a_direct_computation():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = methods.create("prefix_tuning", model, num_virtual_tokens=3, projection_dim=0, seed=2)
    words = ["ba be", "ca", "da de di"]  # 2, 1 and 3 tokens
    clf = VerbalizerClassifier(prompt, ["x", "y", "z"], words, VerbalizerClassifier.label_tokens(tok, "{text}", words))
    assert [len(t) for t in clf.label_token_ids] == [2, 1, 3]
    rows = [[word_id("fa"), word_id("fe"), word_id("fi")], [word_id("ga")], [word_id("ha"), word_id("he")]]
    ids, mask = left_padded(rows)
    with torch.no_grad():
        got = clf(model, ids, mask)  # (3, 3)
        for i, r in enumerate(rows):
            for c, lab in enumerate(clf.label_token_ids):
                seq = torch.tensor([r + lab])
                logits = prompt(model, seq, torch.ones_like(seq)).logits[0]  # (T, V)
                logp = F.log_softmax(logits.float(), -1)
                want = sum(logp[len(r) - 1 + j, t] for j, t in enumerate(lab))
                torch.testing.assert_close(got[i, c], want, atol=1e-5, rtol=0)
    # single-token label words take the one-pass path; it agrees with the general one
    one = VerbalizerClassifier(prompt, ["x", "y"], ["ca", "ga"], [[word_id("ca")], [word_id("ga")]])
    two = VerbalizerClassifier(prompt, ["x", "y", "z"], ["ca", "ga", "ba be"],
                               [[word_id("ca")], [word_id("ga")], [word_id("ba"), word_id("be")]])
    with torch.no_grad():
        torch.testing.assert_close(one(model, ids, mask), two(model, ids, mask)[:, :2], atol=1e-5, rtol=0)


def toy_data(encoder: bool, n=48, seed=0):
    """Label 1: words from the first half of the vocabulary, 0: the second half (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for i in range(n):
        y = i % 2
        lo = 10 if y else 50
        row = torch.randint(lo, lo + 4, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
        ids.append(([5] if encoder else []) + row)
        labels.append(y)
    return ClassificationData(ids, labels, [])


@pytest.mark.parametrize("kind", ["encoder_prefix", "decoder_prefix"])
def test_loss_falls_and_accuracy_is_reported(kind, tmp_path):
    if kind == "encoder_prefix":
        model, tok = tiny_bert(), tiny_tokenizer()
        geo = geometry(model)
        clf = EncoderClassifier(PrefixTuning(geo, 4, 0, torch.randn(geo.prefix_shape(4)) * 0.1), 32, ["no", "yes"])
        data, lr = toy_data(True), 1e-2
    else:
        model, tok = tiny_model("llama"), tiny_tokenizer()
        prompt = methods.create("prefix_tuning", model, num_virtual_tokens=4, projection_dim=0, seed=0)
        clf = VerbalizerClassifier(prompt, ["no", "yes"], ["ca", "ce"], [[word_id("ca")], [word_id("ce")]])
        data, lr = toy_data(False), 3e-1  # a random 2-layer LM moves slowly
    cfg = TrainConfig(steps=40, batch_size=16, lr=lr, metric="accuracy", eval_every=40, schedule="constant")
    trainer = Trainer(model, tok, clf, data, cfg, data, objective=ClassificationObjective(),
                      output=TrainerOutput(tmp_path / "run", save_artifact))
    res = trainer.run()
    losses = [r["loss"] for r in res.history]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    # the one evaluation (step 40) is the best; its figures are those of a fresh predict(), by hand
    preds = predict(clf, model, data, 8, 0).argmax(-1).tolist()
    tp = [sum(p == y == c for p, y in zip(preds, data.labels)) for c in (0, 1)]
    wrong = [sum(p != y for p, y in zip(preds, data.labels) if c in (p, y)) for c in (0, 1)]  # fp + fn
    assert res.best["accuracy"] == pytest.approx(100 * sum(tp) / len(preds)) and res.best["accuracy"] > 75
    assert res.best["f1"] == pytest.approx(100 * sum(2 * t / (2 * t + w) for t, w in zip(tp, wrong)) / 2)
    assert res.best == {k: v for k, v in res.history[-1].items() if k in res.best}
    loaded = load_classifier(tmp_path / "run" / "best", model)
    assert loaded.labels == ["no", "yes"]
    ids, mask = clf.collate(data.ids[:5], 0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(model, ids, mask), clf.eval()(model, ids, mask), atol=1e-6, rtol=0)


def test_accuracy_and_macro_f1():
    r = accuracy_f1([0, 0, 1, 1], [0, 1, 1, 1], 2)
    assert r["accuracy"] == 75.0
    assert r["f1"] == pytest.approx(100 * (2 / 3 + 0.8) / 2)


@pytest.mark.parametrize("form", ["dir", "file.safetensors"])
@pytest.mark.parametrize("method", ["prefix_tuning", "prompt_tuning", "head_only"])
def test_head_and_labels_round_trip_through_the_artifact(form, method, tmp_path):
    bert = tiny_bert()
    geo = geometry(bert)
    prompt = {"prefix_tuning": lambda: PrefixTuning(geo, 3, 0, torch.randn(geo.prefix_shape(3))),
              "prompt_tuning": lambda: PromptTuning(geo, torch.randn(2, 32)), "head_only": lambda: None}[method]()
    clf = EncoderClassifier(prompt, 32, ["neg", "neu", "pos"], "cls", template="Review: {sentence}", seed=3)
    path = save_artifact(clf, tmp_path / form, bert, metrics={"accuracy": 90.0})
    back = load_classifier(path, bert)
    assert (back.labels, back.pooling, back.template, back.method) == (["neg", "neu", "pos"], "cls", "Review: {sentence}", method)
    assert back.card["task"] == "classify" and back.card["classifier"]["kind"] == "head"
    torch.testing.assert_close(back.head.weight, clf.head.weight)
    ids, mask = right_padded(ROWS)
    with torch.no_grad():
        torch.testing.assert_close(back(bert, ids, mask), clf(bert, ids, mask))
    # refused where it does not fit
    with pytest.raises(ArtifactError, match="classifier"):
        load_artifact(path, bert)  # not a prompt for generation
    with pytest.raises(ArtifactError, match="fingerprint"):
        load_classifier(path, tiny_bert(seed=1))
    with pytest.raises(ArtifactError, match="not an encoder"):
        load_classifier(path, tiny_model("llama"), allow_other_base=True)


def test_a_prompt_artifact_is_not_a_classifier_and_a_verbalizer_still_generates(tmp_path):
    model, tok = tiny_model("llama"), tiny_tokenizer()
    prompt = methods.create("prompt_tuning", model, num_virtual_tokens=2)
    save_artifact(prompt, tmp_path / "p", model)
    with pytest.raises(ArtifactError, match="not a classifier"):
        load_classifier(tmp_path / "p", model)
    clf = VerbalizerClassifier(prompt, ["no", "yes"], ["ca", "ce"], [[word_id("ca")], [word_id("ce")]], "{text} ba")
    save_artifact(clf, tmp_path / "v", model)
    back = load_classifier(tmp_path / "v", model)
    assert back.label_words == ["ca", "ce"] and back.template == "{text} ba"
    assert load_artifact(tmp_path / "v", model).method == "prompt_tuning"  # its tensors are a plain prompt


# --- POST /v1/classify ---------------------------------------------------------------------------------

@pytest.fixture
def client(tmp_path):
    from fastapi.testclient import TestClient

    from softprompt.serve import Engine
    from softprompt.serve.classify import ClassifyService
    from softprompt.serve.http import ServerConfig, create_app

    model, tok = tiny_model("llama"), tiny_tokenizer()
    bert, btok = tiny_bert(), tiny_tokenizer()
    btok.padding_side = "right"
    geo = geometry(bert)
    enc = EncoderClassifier(PrefixTuning(geo, 3, 0, torch.randn(geo.prefix_shape(3))), 32, ["neg", "pos"], seed=1)
    save_artifact(enc, tmp_path / "sentiment.safetensors", bert)
    dec = VerbalizerClassifier(methods.create("prefix_tuning", model, num_virtual_tokens=2, projection_dim=0),
                               ["x", "y", "z"], ["ca", "ce", "ba be"],
                               [[word_id("ca")], [word_id("ce")], [word_id("ba"), word_id("be")]], "{text} ga")
    save_artifact(dec, tmp_path / "topic", model)
    save_artifact(methods.create("prompt_tuning", model, num_virtual_tokens=2), tmp_path / "gen", model)
    tasks = {"sentiment": tmp_path / "sentiment.safetensors", "topic": tmp_path / "topic", "gen": tmp_path / "gen"}
    engine = Engine(model, tok, tasks)
    service = ClassifyService(model, tok, engine.tasks.resolve, encoder_loader=lambda card: (bert, btok))
    app = create_app(engine, None, ServerConfig(base_model_id="tiny"), classifier=service)
    with TestClient(app) as c:
        c.expected = {"sentiment": (enc, bert, btok), "topic": (dec, model, tok)}
        yield c


def test_classify_route_returns_labels_and_probabilities(client):
    from softprompt.io.classifier import classify_texts

    for task, texts in (("sentiment", ["ba be bi", "fa"]), ("topic", ["ha he hi ho"])):
        r = client.post("/v1/classify", json={"model": task, "input": texts})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == task and len(body["data"]) == len(texts)
        clf, m, t = client.expected[task]
        want = classify_texts(clf.eval(), m, t, texts)
        for i, d in enumerate(body["data"]):
            assert d["index"] == i and list(d["probabilities"]) == clf.labels
            assert sum(d["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
            assert d["probabilities"] == pytest.approx(dict(zip(clf.labels, want[i].tolist())), abs=1e-5)
            assert d["label"] == max(d["probabilities"], key=d["probabilities"].get)
    one = client.post("/v1/classify", json={"model": "topic", "input": "ha he hi ho"}).json()
    assert one["data"][0]["probabilities"] == pytest.approx(
        client.post("/v1/classify", json={"model": "topic", "input": ["ha he hi ho"]}).json()["data"][0]["probabilities"])


@pytest.mark.parametrize("body,status,code", [
    ({"model": "nope", "input": "ba"}, 404, "model_not_found"),
    ({"model": "gen", "input": "ba"}, 400, "task_refused"),
    ({"model": "sentiment", "input": []}, 400, "invalid_parameter"),
    ({"model": "sentiment", "input": ["ba", "  "]}, 400, "invalid_parameter"),
    ({"model": "sentiment", "input": ["ba"] * 65}, 400, "invalid_parameter"),
    ({"model": "sentiment", "input": 3}, 400, "invalid_parameter"),
    ({"model": "sentiment"}, 400, "invalid_parameter"),
])
def test_classify_route_rejects_bad_requests_in_openai_shape(client, body, status, code):
    r = client.post("/v1/classify", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and "type" in err
    # a generation route refuses a head classifier, pointing at /v1/classify
    r = client.post("/v1/completions", json={"model": "sentiment", "prompt": "ba", "max_tokens": 2})
    assert r.status_code == 400 and "classif" in r.json()["error"]["message"]


def test_classifiers_live_in_the_store_and_serve_from_it(tmp_path):
    from softprompt.serve.classify import ClassifyService
    from softprompt.serve.tasks import TaskRefused, TaskRegistry
    from softprompt.store.core import Store

    bert, btok = tiny_bert(), tiny_tokenizer()
    btok.padding_side = "right"
    clf = EncoderClassifier(None, 32, ["neg", "pos"], seed=2)
    save_artifact(clf, tmp_path / "c.safetensors", bert)
    store = Store(tmp_path / "store")
    ref = store.add("sst2", tmp_path / "c.safetensors")
    assert store.ls()[0]["method"] == "head_only" and ref.version == 1
    model, tok = tiny_model("llama"), tiny_tokenizer()
    service = ClassifyService(model, tok, TaskRegistry(fallback=store.entry).resolve,
                              encoder_loader=lambda card: (bert, btok))
    out = service.classify("sst2@1", ["ba be", "fa"])
    want = classify_texts_ref(clf, bert, btok, ["ba be", "fa"])
    assert [o["label"] for o in out] == [clf.labels[i] for i in want.argmax(-1).tolist()]
    assert out[1]["probabilities"]["pos"] == pytest.approx(float(want[1, 1]), abs=1e-6)
    with pytest.raises(TaskRefused, match="fingerprint"):  # other encoder weights
        ClassifyService(model, tok, TaskRegistry(fallback=store.entry).resolve,
                        encoder_loader=lambda card: (tiny_bert(seed=5), btok)).classify("sst2", ["ba"])


def classify_texts_ref(clf, model, tok, texts):
    from softprompt.io.classifier import classify_texts

    return classify_texts(clf.eval(), model, tok, texts)
