"""Zero-shot evaluation: scoring against a hand computation on a tiny model, the lm-eval
tokenization rules, task files (formats, malformed lines, limits), errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny

from sdsx.eval import zeroshot as zs

TEXT = (
    "The cat sat on the mat. The dog ran in the park. A bird sang in the tree while the sun rose. "
    "She opened the door, and the wind blew the papers off the table. He cooked rice for dinner. "
)


def tiny_tokenizer(adds_bos: bool = False):
    """A byte-level BPE (vocab ~300) trained on TEXT in milliseconds; BOS = EOS = <|endoftext|>,
    which it does not add (GPT-2-like). ``adds_bos``: BOS is <s> instead, and the tokenizer starts
    every text with it (LLaMA/Gemma-like)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"] + (["<s>"] if adds_bos else []), show_progress=False,
    )
    tok.train_from_iterator([TEXT * 10], trainer)
    if not adds_bos:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny("llama", vocab=len(tok), seed=1)


CHOICE_ITEMS = [
    {"query": "Question: Where did the cat sit?\n", "choices": ["On the mat.", "In the park, running fast."], "gold": 0},
    {"query": "The dog ran in the", "choices": ["park.", "tree.", "door and the wind"], "gold": 0},
    {"query": "He cooked", "choices": ["rice", "the table"], "gold": 1},
    {"query": "A bird sang, therefore", "choices": ["the sun rose.", "she opened the door."], "gold": 1},
]
PARTIAL_ITEMS = [
    {"context_options": ["The cat sat on the mat so the cat", "The cat sat on the mat so the dog"], "continuation": "was happy.", "gold": 0},
    {"context_options": ["She opened the door because she", "She opened the door because he"], "continuation": "cooked rice.", "gold": 1},
]
GREEDY_ITEMS = [
    {"context": "The cat sat on the", "continuation": "mat"},
    {"context": "A bird sang in the", "continuation": "tree"},
    {"context": "He cooked rice for", "continuation": "dinner"},
]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path):
    write_jsonl(tmp_path / "piqa.jsonl", CHOICE_ITEMS)
    write_jsonl(tmp_path / "winogrande.jsonl", PARTIAL_ITEMS)
    write_jsonl(tmp_path / "lambada_openai.jsonl", GREEDY_ITEMS)
    return tmp_path


def hand_loglik(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """One unbatched forward on context + continuation, lm-eval's rules written out plainly."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    ctx = tok(stripped, add_special_tokens=False)["input_ids"]
    whole = tok(stripped + continuation, add_special_tokens=False)["input_ids"]
    if not ctx:
        ctx, whole = [tok.bos_token_id], [tok.bos_token_id] + whole
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].double().log_softmax(-1)
    total, greedy = 0.0, True
    for j, t in enumerate(cont):
        row = logp[len(ctx) - 1 + j]
        total += float(row[t])
        greedy &= int(row.argmax()) == t
    return total, greedy


# ----------------------------------------------------------------------------------- tokenization
def test_encode_pair_moves_trailing_whitespace_to_the_continuation(tok):
    ctx, cont = zs.encode_pair(tok, "Question: where?\n", " On the mat.")
    assert ctx == tok("Question: where?", add_special_tokens=False)["input_ids"]
    whole = tok("Question: where?\n On the mat.", add_special_tokens=False)["input_ids"]
    assert ctx + cont == whole


def test_encode_pair_space_goes_with_the_word(tok):
    ctx, cont = zs.encode_pair(tok, "The cat sat on the", " mat")
    assert ctx + cont == tok("The cat sat on the mat", add_special_tokens=False)["input_ids"]
    assert tok.decode(cont) == " mat"


def test_encode_pair_bos_rules(tok):
    bos = tok.bos_token_id
    ctx, cont = zs.encode_pair(tok, "", "The cat")
    assert ctx == [bos] and cont == tok("The cat", add_special_tokens=False)["input_ids"]
    ctx, _ = zs.encode_pair(tok, "The cat", " sat")
    assert bos not in ctx  # add_bos=False: no BOS (zero_shot decides it per tokenizer: context_bos)
    ctx, _ = zs.encode_pair(tok, "The cat", " sat", add_bos=True)
    assert ctx[0] == bos and ctx[1:] == tok("The cat", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------- scoring
def test_multiple_choice_matches_hand_computation(model, tok, data_dir):
    res = zs.zero_shot(model, tok, "piqa", data_dir=data_dir, batch_size=3, progress=False, log_samples=True)["piqa"]
    acc = acc_norm = 0
    for item, sample in zip(CHOICE_ITEMS, res["samples"]):
        hand = [hand_loglik(model, tok, item["query"], " " + c)[0] for c in item["choices"]]
        assert sample["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
        pred = max(range(len(hand)), key=lambda i: (hand[i], -i))
        norm = [h / len(c) for h, c in zip(hand, item["choices"])]  # characters, as lm-eval
        pred_norm = max(range(len(norm)), key=lambda i: (norm[i], -i))
        assert (sample["pred"], sample["pred_norm"]) == (pred, pred_norm)
        acc += pred == item["gold"]
        acc_norm += pred_norm == item["gold"]
    n = len(CHOICE_ITEMS)
    assert res["n"] == n
    assert res["acc"] == pytest.approx(acc / n)
    assert res["acc_norm"] == pytest.approx(acc_norm / n)
    p = acc / n
    assert res["acc_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)))
    assert res["chance"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 2) / 4)


def test_batch_size_does_not_change_scores(model, tok, data_dir):
    a = zs.zero_shot(model, tok, "piqa", data_dir=data_dir, batch_size=1, progress=False, log_samples=True)["piqa"]
    b = zs.zero_shot(model, tok, "piqa", data_dir=data_dir, batch_size=8, progress=False, log_samples=True)["piqa"]
    for x, y in zip(a["samples"], b["samples"]):
        assert x["loglikelihoods"] == pytest.approx(y["loglikelihoods"], abs=1e-4)


def test_winogrande_partial_scoring(model, tok, data_dir):
    res = zs.zero_shot(model, tok, ["winogrande"], data_dir=data_dir, progress=False, log_samples=True)["winogrande"]
    hits = 0
    for item, sample in zip(PARTIAL_ITEMS, res["samples"]):
        hand = [hand_loglik(model, tok, ctx, " " + item["continuation"])[0] for ctx in item["context_options"]]
        assert sample["loglikelihoods"] == pytest.approx(hand, abs=1e-4)
        hits += int(hand.index(max(hand)) == item["gold"])
    assert res["acc"] == pytest.approx(hits / len(PARTIAL_ITEMS))
    assert "acc_norm" not in res  # lm-eval reports acc only for WinoGrande


def test_lambada_greedy_and_perplexity(model, tok, data_dir):
    res = zs.zero_shot(model, tok, "lambada", data_dir=data_dir, progress=False, log_samples=True)["lambada_openai"]
    hand = [hand_loglik(model, tok, i["context"], " " + i["continuation"]) for i in GREEDY_ITEMS]
    assert [s["loglikelihood"] for s in res["samples"]] == pytest.approx([h[0] for h in hand], abs=1e-4)
    assert [s["greedy"] for s in res["samples"]] == [h[1] for h in hand]
    mean = sum(h[0] for h in hand) / len(hand)
    assert res["perplexity"] == pytest.approx(math.exp(-mean), rel=1e-4)  # per item, as lm-eval
    assert res["acc"] == pytest.approx(sum(h[1] for h in hand) / len(hand))


def test_greedy_flag_on_the_models_own_continuation(model):
    ctx = [5, 17, 42, 99, 7]
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    cont = ids[len(ctx):]
    wrong = cont[:-1] + [(cont[-1] + 1) % 50]
    (ll, greedy), (ll2, greedy2) = zs.loglikelihoods(model, [(ctx, cont), (ctx, wrong)], progress=False)
    assert greedy and not greedy2
    assert ll > ll2


class _FullLogits(torch.nn.Module):
    """The same model behind a forward without ``logits_to_keep``: the full-logits path."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, use_cache=False):
        return self.inner(input_ids=input_ids, use_cache=use_cache)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_head_only_where_needed_matches_full_logits(family):
    model = make_tiny(family, vocab=97, seed=3)
    g = torch.Generator().manual_seed(0)
    requests = []
    for ctx_len, cont_len in ((3, 1), (9, 4), (1, 2), (20, 3), (6, 6), (14, 1), (2, 5)):
        ctx = torch.randint(0, 97, (ctx_len,), generator=g).tolist()
        requests.append((ctx, torch.randint(0, 97, (cont_len,), generator=g).tolist()))
    # two greedy continuations (the model's own argmax), so that the greedy flags are not all False
    for ctx in ([5, 17, 42, 9], [60, 2, 33, 33, 8, 71, 4]):
        ids = list(ctx)
        with torch.no_grad():
            for _ in range(3):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        requests.append((ctx, ids[len(ctx):]))
    assert zs.accepts_logits_to_keep(model) and not zs.accepts_logits_to_keep(_FullLogits(model))
    kept = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: kept.append(kw.get("logits_to_keep")), with_kwargs=True)
    try:
        fast = zs.loglikelihoods(model, requests, batch_size=3, progress=False)
    finally:
        hook.remove()
    full = zs.loglikelihoods(_FullLogits(model), requests, batch_size=3, progress=False)
    # one 1-D index tensor per batch: the longest batch (inputs of 22, 14 and 12 tokens, continuations
    # of 3, 1 and 4) keeps the union of positions 19..21, 13 and 8..11, not all 22
    assert len(kept) == 3 and all(isinstance(k, torch.Tensor) and k.ndim == 1 for k in kept)
    assert kept[0].tolist() == [8, 9, 10, 11, 13, 19, 20, 21]
    assert [ll for ll, _ in fast] == pytest.approx([ll for ll, _ in full], abs=1e-5)
    assert [gr for _, gr in fast] == [gr for _, gr in full]
    assert sum(gr for _, gr in fast) == 2


def test_left_truncation_to_the_model_length(tok):
    model = make_tiny("llama", vocab=len(tok), seed=2)
    model.config.max_position_embeddings = 16
    ctx, cont = list(range(3, 33)), [40, 41, 42]
    (ll, _), = zs.loglikelihoods(model, [(ctx, cont)], progress=False)
    window = (ctx + cont)[-17:][:-1]
    with torch.no_grad():
        logp = model(torch.tensor([window])).logits[0].log_softmax(-1)
    expected = sum(float(logp[len(window) - 3 + j, t]) for j, t in enumerate(cont))
    assert ll == pytest.approx(expected, abs=1e-4)


def test_limit_keeps_the_first_items(model, tok, data_dir):
    res = zs.zero_shot(model, tok, "piqa,winogrande", data_dir=data_dir, limit=2, progress=False)
    assert res["piqa"]["n"] == 2 and res["winogrande"]["n"] == 2
    assert res["piqa"]["source"].endswith("piqa.jsonl")


def test_a_task_given_as_a_path(model, tok, tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", CHOICE_ITEMS[:2])
    res = zs.zero_shot(model, tok, [str(path)], progress=False)
    assert set(res) == {"mine"} and res["mine"]["kind"] == "choice" and res["mine"]["n"] == 2


def test_model_mode_is_restored(model, tok, data_dir):
    model.train()
    zs.zero_shot(model, tok, "piqa", data_dir=data_dir, limit=1, progress=False)
    assert model.training
    model.eval()


# ------------------------------------------------------------------------------------------ errors
def test_malformed_line_names_file_and_line(model, tok, tmp_path):
    path = tmp_path / "piqa.jsonl"
    path.write_text(json.dumps(CHOICE_ITEMS[0]) + "\n\n" + '{"query": "x", "choices": ["a", "b"], "gold": 0\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"piqa\.jsonl:3: not valid JSON"):
        zs.zero_shot(model, tok, "piqa", data_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"query": "q", "choices": ["a"], "gold": 0}, "at least 2"),
        ({"query": "q", "choices": ["a", "b"], "gold": 2}, r'"gold" in \[0, 2\)'),
        ({"choices": ["a", "b"], "gold": 0}, '"query"'),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_items_are_named(tmp_path, bad, message):
    path = tmp_path / "copa.jsonl"
    path.write_text(json.dumps(CHOICE_ITEMS[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"copa\.jsonl:2: .*{message}"):
        zs.load_task("copa", tmp_path)


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task 'hellaswag'; known tasks: piqa"):
        zs.resolve_tasks("piqa,hellaswag")


def test_missing_task_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hub is not reachable; pass data_dir="):
        zs.load_task("arc_easy", tmp_path)


def test_missing_task_file_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zs.load_task("/nonexistent/tasks/mine.jsonl")


def test_bad_arguments(model, tok, data_dir):
    with pytest.raises(ValueError, match="limit"):
        zs.zero_shot(model, tok, "piqa", data_dir=data_dir, limit=0)
    with pytest.raises(ValueError, match="batch_size"):
        zs.loglikelihoods(model, [([1], [2])], batch_size=0)


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SDSX_DATA", str(tmp_path))
    assert zs.default_data_dir() == tmp_path / "zeroshot"


def test_hub_rows_convert_to_local_formats():
    assert zs.convert_hub_row("winogrande", {"sentence": "A ate B so _ was full.", "option1": "A", "option2": "B", "answer": "1"}) == {
        "context_options": ["A ate B so A", "A ate B so B"], "continuation": "was full.", "gold": 0}
    assert zs.convert_hub_row("lambada_openai", {"text": "he said hello"}) == {"context": "he said", "continuation": "hello"}
    copa = zs.convert_hub_row("copa", {"premise": "The man fell.", "question": "cause", "choice1": "He tripped.", "choice2": "He sang.", "label": 0})
    assert copa == {"query": "The man fell, because", "choices": ["he tripped.", "he sang."], "gold": 0}
    arc = zs.convert_hub_row("arc_easy", {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"})
    assert arc == {"query": "Question: Q?", "choices": ["x", "y"], "gold": 1}


# --------------------------------------------------------------------------------- lm-eval adapter
def _flat(samples):
    return [s.get("loglikelihoods", [s.get("loglikelihood")]) for s in samples]


def test_lm_eval_agrees_item_by_item(model, tok, data_dir):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra sdsx[lmeval]")
    from sdsx.eval.lmeval import lm_eval_zero_shot

    theirs = lm_eval_zero_shot(model, tok, "piqa,winogrande,lambada_openai", data_dir=data_dir, log_samples=True)
    ours = zs.zero_shot(model, tok, "piqa,winogrande,lambada_openai", data_dir=data_dir, progress=False, log_samples=True)
    for task in ours:
        for a, b in zip(theirs[task]["samples"], _flat(ours[task]["samples"])):
            assert a == pytest.approx(b, abs=1e-4), task
        for metric in ("acc", "acc_norm"):
            if metric in ours[task]:
                assert theirs[task][metric] == pytest.approx(ours[task][metric]), (task, metric)
                assert theirs[task][f"{metric}_stderr"] == pytest.approx(ours[task][f"{metric}_stderr"]), (task, metric)
    assert theirs["lambada_openai"]["perplexity"] == pytest.approx(ours["lambada_openai"]["perplexity"], rel=1e-4)


def test_lm_eval_adapter_is_not_imported_by_default():
    import subprocess
    import sys

    code = "import sys, sdsx, sdsx.eval.zeroshot, sdsx.cli; print('lm_eval' in sys.modules, 'sdsx.eval.lmeval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["False", "False"], out.stderr


# ------------------------------------------------------------------------------------- integration
@pytest.mark.integration
def test_smollm2_all_tasks_few_items(smollm2):
    if zs.default_data_dir() is None:
        pytest.skip("no local zero-shot data (../shared/data/zeroshot or $SDSX_DATA)")
    model, tok = smollm2
    res = zs.zero_shot(model, tok, "all", limit=3, progress=False)
    assert set(res) == set(zs.KNOWN_TASKS)
    for r in res.values():
        assert r["n"] == 3 and 0.0 <= r["acc"] <= 1.0
    assert 1.0 < res["lambada_openai"]["perplexity"] < 1e4


@pytest.mark.integration
def test_smollm2_lm_eval_agrees_on_a_few_items_per_task(smollm2):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional extra sdsx[lmeval]")
    if zs.default_data_dir() is None:
        pytest.skip("no local zero-shot data (../shared/data/zeroshot or $SDSX_DATA)")
    from sdsx.eval.lmeval import lm_eval_zero_shot

    model, tok = smollm2
    theirs = lm_eval_zero_shot(model, tok, "all", limit=3, log_samples=True)
    ours = zs.zero_shot(model, tok, "all", limit=3, progress=False, log_samples=True)
    for task in zs.KNOWN_TASKS:
        for a, b in zip(theirs[task]["samples"], _flat(ours[task]["samples"])):
            assert a == pytest.approx(b, abs=1e-3), task
        assert theirs[task]["acc"] == pytest.approx(ours[task]["acc"]), task
