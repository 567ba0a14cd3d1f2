"""How windows start (sdsx.data.bos): per-window BOS where the tokenizer starts texts with it, one
token stream otherwise or with bos="never"; in calibration, perplexity and zero-shot."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny
from test_zeroshot import CHOICE_ITEMS, TEXT, tiny_tokenizer, write_jsonl

import sdsx
from sdsx.data.bos import bos_id, expects_bos, protocol
from sdsx.eval import zeroshot as zs


@pytest.fixture(scope="module")
def bos_tok():
    return tiny_tokenizer(adds_bos=True)


@pytest.fixture(scope="module")
def plain_tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(bos_tok):
    return make_tiny("llama", vocab=len(bos_tok), seed=2)


def test_the_rule_reads_the_tokenizer(bos_tok, plain_tok):
    assert expects_bos(bos_tok) and not expects_bos(plain_tok)
    assert not expects_bos(lambda text: [1, 2])  # a plain callable never says so
    assert bos_id(bos_tok) == bos_tok.bos_token_id == bos_id(bos_tok, "always")
    assert bos_id(plain_tok) is None and bos_id(bos_tok, "never") is None
    assert bos_id(plain_tok, "always") == plain_tok.bos_token_id  # forced, for a tokenizer that has one
    with pytest.raises(ValueError, match="bos must be one of auto, always, never"):
        bos_id(bos_tok, "yes")
    with pytest.raises(ValueError, match="use bos='never'"):
        bos_id(lambda text: [1], "always")
    assert protocol("auto", None)["windows"].startswith("windows of seqlen tokens cut from one token stream")


def test_calibration_windows_start_with_bos_when_the_tokenizer_does(bos_tok, plain_tok):
    auto = sdsx.calibration([TEXT * 20], bos_tok, nsamples=6, seqlen=24, seed=1)
    assert auto.shape == (6, 24) and bool((auto[:, 0] == bos_tok.bos_token_id).all())
    text_ids = torch.tensor(bos_tok(TEXT * 20, add_special_tokens=False)["input_ids"])
    stream = text_ids.unfold(0, 23, 1)
    assert all(bool((stream == row[1:]).all(1).any()) for row in auto)  # BOS + 23 text tokens
    never = sdsx.calibration([TEXT * 20], bos_tok, nsamples=6, seqlen=24, seed=1, bos="never")
    assert not torch.equal(auto, never) and int((never == bos_tok.bos_token_id).sum()) <= 1  # only the stream's first
    # a tokenizer without BOS: the two protocols are one
    assert torch.equal(
        sdsx.calibration([TEXT * 20], plain_tok, nsamples=6, seqlen=24, seed=1),
        sdsx.calibration([TEXT * 20], plain_tok, nsamples=6, seqlen=24, seed=1, bos="never"),
    )


def hand_ppl(model, windows: list[list[int]]) -> float:
    """exp of the mean NLL of tokens 1..L-1 of every window, one unbatched forward each."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = model(torch.tensor([w])).logits[0].double().log_softmax(-1)
            nll -= sum(float(logp[t, w[t + 1]]) for t in range(len(w) - 1))
            count += len(w) - 1
    return math.exp(nll / count)


def test_perplexity_protocols_differ_with_bos_and_agree_without(model, bos_tok, plain_tok):
    text = TEXT * 6
    L = 32
    text_ids = bos_tok(text, add_special_tokens=False)["input_ids"]
    bos = bos_tok.bos_token_id
    per_window = [[bos] + text_ids[k : k + L - 1] for k in range(0, len(text_ids) - L + 2, L - 1)]
    auto = sdsx.perplexity(model, text, bos_tok, seqlen=L, progress=False)
    assert auto == pytest.approx(hand_ppl(model, per_window), rel=1e-6)  # BOS is context, never a target
    stream = bos_tok(text)["input_ids"]  # one BOS at the very start
    one_stream = [stream[k : k + L] for k in range(0, len(stream) - L + 1, L)]
    never = sdsx.perplexity(model, text, bos_tok, seqlen=L, progress=False, bos="never")
    assert never == pytest.approx(hand_ppl(model, one_stream), rel=1e-6)
    assert abs(auto - never) > 1e-3 * never
    # token ids of a default encoding (leading BOS) with the tokenizer give the same as the text
    ids = torch.tensor(stream)
    assert sdsx.perplexity(model, ids, bos_tok, seqlen=L, progress=False) == pytest.approx(auto, rel=1e-12)
    assert sdsx.perplexity(model, ids, seqlen=L, progress=False) == pytest.approx(never, rel=1e-12)  # no tokenizer: a stream
    # a tokenizer that adds no BOS: both protocols are the same windows
    a = sdsx.perplexity(model, text, plain_tok, seqlen=L, progress=False)
    assert a == sdsx.perplexity(model, text, plain_tok, seqlen=L, progress=False, bos="never")
    assert sdsx.perplexity(model, text, plain_tok, seqlen=L, progress=False, bos="always") != a


def test_zero_shot_prefix_follows_the_tokenizer(model, bos_tok, plain_tok, tmp_path):
    assert zs.context_bos(bos_tok) and not zs.context_bos(plain_tok)
    assert zs.context_bos(plain_tok, "always") and not zs.context_bos(bos_tok, "never")
    write_jsonl(tmp_path / "piqa.jsonl", CHOICE_ITEMS)

    def lls(tok, bos):
        res = zs.zero_shot(model, tok, "piqa", data_dir=tmp_path, progress=False, log_samples=True, bos=bos)["piqa"]
        return [s["loglikelihoods"] for s in res["samples"]]

    assert lls(bos_tok, "auto") == lls(bos_tok, "always") != lls(bos_tok, "never")
    assert lls(plain_tok, "auto") == lls(plain_tok, "never")
    from sdsx.eval.lmeval import lm_eval_zero_shot

    with pytest.raises(ValueError, match="needs the built-in evaluator"):  # lm-eval adds BOS only as the tokenizer does
        lm_eval_zero_shot(model, plain_tok, "piqa", data_dir=tmp_path, bos="always")


def test_cli_option_and_record(model, bos_tok, tmp_path, capsys):
    import json

    from sdsx.cli import main

    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    bos_tok.save_pretrained(folder)
    (tmp_path / "eval.txt").write_text(TEXT * 6, encoding="utf-8")
    ppl = {}
    for mode in ("auto", "never"):
        report = tmp_path / f"r-{mode}"
        rc = main(["eval", str(folder), "--ppl", str(tmp_path / "eval.txt"), "--ppl-seqlen", "32", "--bos", mode,
                   "--no-progress", "-q", "--report", str(report)])
        assert rc == 0, capsys.readouterr().err
        record = json.loads((report / "report.json").read_text())
        ppl[mode] = record["rows"][0]["ppl eval"]
        assert record["meta"]["protocol"] == protocol(mode, bos_tok.bos_token_id if mode == "auto" else None)
    # the folder's own tokenizer, reloaded, decides "auto" as the in-memory one does
    assert ppl["auto"] == pytest.approx(sdsx.perplexity(model, TEXT * 6, bos_tok, seqlen=32, progress=False), rel=1e-9)
    assert ppl["never"] == pytest.approx(sdsx.perplexity(model, TEXT * 6, bos_tok, seqlen=32, progress=False, bos="never"), rel=1e-9)
    capsys.readouterr()
    assert main(["eval", str(folder), "--bos", "maybe"]) == 2
    assert "invalid choice: 'maybe'" in capsys.readouterr().err
