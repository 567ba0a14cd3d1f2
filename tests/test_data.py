"""Calibration sampling and evaluation text loading."""

from __future__ import annotations

import json

import pytest
import torch

import sdsx.data.text as text_mod
from sdsx.data import calibration, encode, load_text

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex jovial bumpkins".split()


def char_tokenizer(text: str) -> list[int]:
    """A toy tokenizer: one id per character."""
    return [ord(c) % 128 for c in text]


def corpus(n_words: int = 2000) -> list[str]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return [" ".join(WORDS[i] for i in idx[k : k + 20]) for k in range(0, n_words, 20)]


def test_shape_and_windows_come_from_the_text():
    rows = corpus()
    ids = torch.tensor(char_tokenizer("\n\n".join(rows)))
    out = calibration(rows, char_tokenizer, nsamples=6, seqlen=50, seed=3)
    assert out.shape == (6, 50) and out.dtype == torch.long
    stream = ids.unfold(0, 50, 1)
    for window in out:
        assert bool((stream == window).all(1).any())


def test_seed_reproducible_and_seed_sensitive():
    rows = corpus()
    a = calibration(rows, char_tokenizer, nsamples=8, seqlen=32, seed=0)
    b = calibration(rows, char_tokenizer, nsamples=8, seqlen=32, seed=0)
    c = calibration(rows, char_tokenizer, nsamples=8, seqlen=32, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(a, calibration(rows, char_tokenizer, nsamples=8, seqlen=32, seed=0))


def test_local_txt_and_jsonl(tmp_path):
    rows = corpus(400)
    txt = tmp_path / "calib.txt"
    txt.write_text("\r\n".join(rows), encoding="utf-8")
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": r, "id": i}) for i, r in enumerate(rows)) + "\n", encoding="utf-8")
    from_txt = calibration(txt, char_tokenizer, nsamples=4, seqlen=40, seed=0)
    from_jsonl = calibration(str(jsonl), char_tokenizer, nsamples=4, seqlen=40, seed=0)
    from_rows = calibration(rows, char_tokenizer, nsamples=4, seqlen=40, seed=0)
    assert torch.equal(from_jsonl, from_rows)  # jsonl rows are joined like an iterable
    assert from_txt.shape == (4, 40) and not bool((from_txt == ord("\r")).any())


def test_jsonl_without_text_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "hello"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match='"text" field'):
        calibration(bad, char_tokenizer, nsamples=1, seqlen=2)


def test_too_little_text_says_how_much():
    with pytest.raises(ValueError, match=r"has 11 tokens.*needs at least 64"):
        calibration(["hello world"], char_tokenizer, nsamples=2, seqlen=64)
    with pytest.raises(ValueError, match="empty"):
        calibration(["", "  "], char_tokenizer, nsamples=2, seqlen=4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="nsamples"):
        calibration(corpus(), char_tokenizer, nsamples=0, seqlen=8)
    with pytest.raises(ValueError, match="seqlen"):
        calibration(corpus(), char_tokenizer, nsamples=1, seqlen=0)
    with pytest.raises(FileNotFoundError, match="neither an existing file nor a known dataset"):
        calibration("/no/such/file.txt", char_tokenizer)
    with pytest.raises(TypeError, match="strings"):
        calibration([1, 2, 3], char_tokenizer)


def test_hub_name_offline_gives_a_clear_error(monkeypatch):
    monkeypatch.setattr(text_mod, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    for name in ("c4", "wikitext2", "ptb"):
        with pytest.raises(ConnectionError, match="local path"):
            calibration(name, char_tokenizer, nsamples=1, seqlen=8)
    with pytest.raises(ConnectionError, match="local path"):
        load_text("wikitext2")


def test_load_text_wikitext_raw_protocol(tmp_path):
    raw = tmp_path / "wiki.test.raw"
    raw.write_bytes(b" = Title = \r\n Body line one .\r\n Body line two .\r\n")
    # rows as the hub has them ("...\n"), joined with "\n\n" as the SparseGPT/Wanda scripts do
    assert load_text(raw) == " = Title = \n\n\n Body line one .\n\n\n Body line two .\n"


def test_load_text_other_sources(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes(b"line one\r\nline two\r\n")
    assert load_text(txt) == "line one\nline two\n"
    assert load_text(["a", "b"]) == "a\n\nb"
    with pytest.raises(FileNotFoundError):
        load_text("nope-not-a-dataset")


def test_encode_accepts_hf_tokenizers_and_callables():
    assert encode(char_tokenizer, "ab").tolist() == [97, 98]
    assert encode(lambda s: {"input_ids": [1, 2]}, "x").tolist() == [1, 2]
    with pytest.raises(TypeError):
        encode(42, "x")
