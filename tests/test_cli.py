"""The command line, in process (``sdsx.cli.main([...])``) on a tiny model folder with its own
tokenizer, plus one subprocess: prune / eval / compare, saved models, reports, and every bad input
ending in one line on stderr with a non-zero exit status."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny
from test_zeroshot import CHOICE_ITEMS, GREEDY_ITEMS, PARTIAL_ITEMS, TEXT, tiny_tokenizer, write_jsonl

from sdsx.cli import main
from sdsx.data.bos import protocol
from sdsx.eval.zeroshot import default_data_dir
from sdsx.io import CHECKPOINT_MARKER, META_NAME
from sdsx.model.blocks import find_blocks, find_linears, get_weight, set_weight

REAL_ZEROSHOT = default_data_dir()  # before the hermetic fixture points SDSX_DATA elsewhere


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny LLaMA folder with tokenizer, calibration and evaluation texts, and zero-shot tasks.
    SDSX_DATA points at an empty data root so that no default from ../shared is used."""
    root = tmp_path_factory.mktemp("cli")
    tok = tiny_tokenizer()
    model = make_tiny("llama", vocab=len(tok), seed=3)
    model.save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    (root / "calib.txt").write_text(TEXT * 30, encoding="utf-8")
    (root / "eval.txt").write_text(TEXT[::-1] * 10 + TEXT * 10, encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "piqa.jsonl", CHOICE_ITEMS)
    write_jsonl(tasks / "winogrande.jsonl", PARTIAL_ITEMS)
    write_jsonl(tasks / "lambada_openai.jsonl", GREEDY_ITEMS)
    (root / "data").mkdir()
    return root


@pytest.fixture(autouse=True)
def hermetic(monkeypatch, files):
    monkeypatch.setenv("SDSX_DATA", str(files / "data"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def base(files, *extra):
    return [
        str(files / "tiny"), "--calib", str(files / "calib.txt"), "--nsamples", "4", "--seqlen", "32",
        "--ppl", str(files / "eval.txt"), "--ppl-seqlen", "64", "--no-progress", "-q", *extra,
    ]


def table_value(out: str, method: str, column: str) -> str:
    lines = [l for l in out.splitlines() if l.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[1] == method:
            return cells[head.index(column)]
    raise AssertionError(f"no row {method} in\n{out}")


def one_line_error(err: str, pattern: str) -> None:
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines, "nothing on stderr"
    assert re.search(pattern, lines[-1]), lines[-1]
    assert "error:" in lines[-1]


# ------------------------------------------------------------------------------------ happy paths
def test_prune_saves_reloads_and_reports(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    import sdsx

    out = tmp_path / "pruned"
    rc = main(["prune", *base(files, "--method", "sparsegpt", "--sparsity", "2:4", "--out", str(out), "--save-masks")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    dense_ppl = float(table_value(captured.out, "dense", "ppl eval"))
    pruned_ppl = float(table_value(captured.out, "sparsegpt", "ppl eval"))
    assert math.isfinite(dense_ppl) and math.isfinite(pruned_ppl) and dense_ppl != pruned_ppl
    meta = json.loads((out / META_NAME).read_text())
    assert meta["method"] == "sparsegpt" and meta["pattern"] == "2:4" and meta["masks"] == "masks.safetensors"
    stream = protocol("auto", None)  # the tiny tokenizer adds no BOS: windows cut from one stream
    assert meta["calibration"] == {"source": str(files / "calib.txt"), "nsamples": 4, "seqlen": 32, "seed": 0, "tokens": 128, **stream}
    assert {k: meta["meta"]["evaluation"][k] for k in stream} == stream
    assert meta["meta"]["command"].startswith("sdsx prune ")
    assert (out / "report" / "report.md").is_file() and (out / "report" / "layer_errors.png").is_file()
    # plain transformers gives the printed perplexity to the printed digits
    again = AutoModelForCausalLM.from_pretrained(str(out))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    ppl = sdsx.perplexity(again, (files / "eval.txt").read_text(), tok, seqlen=64, progress=False)
    assert f"{ppl:.3f}" == f"{pruned_ppl:.3f}"
    assert meta["meta"]["pruned"]["ppl"] == pytest.approx(ppl, rel=1e-6)


def test_prune_sds_with_tasks_writes_histograms(files, tmp_path, capsys):
    rep = tmp_path / "rep"
    rc = main(["prune", *base(files, "--method", "sds", "--pruner", "wanda", "--sparsity", "0.5", "--dense-iters", "2",
                              "--adjust-iters", "2", "--adjust-score", "activation", "--tasks", "piqa,winogrande", "--limit", "2",
                              "--data-dir", str(files / "tasks"), "--report", str(rep))])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "piqa acc" in captured.out and "winogrande acc" in captured.out and "sds-wanda" in captured.out
    assert (rep / "histograms_sds-wanda-0.5.png").is_file()
    data = json.loads((rep / "report.json").read_text())
    assert data["runs"][0]["options"]["dense_iters"] == 2
    assert data["runs"][0]["options"]["adjust_score"] == "activation"
    assert data["meta"]["pruned"]["zeroshot"]["piqa"]["n"] == 2


def test_eval_of_a_saved_model_and_a_broken_one(files, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["prune", *base(files, "--method", "wanda", "--sparsity", "2:4", "--out", str(out), "--ppl", "none")]) == 0
    capsys.readouterr()
    rc = main(["eval", str(out), "--ppl", str(files / "eval.txt"), "--ppl-seqlen", "64", "--tasks", "piqa,lambada",
               "--data-dir", str(files / "tasks"), "--no-progress", "-q", "--report", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert table_value(captured.out, "wanda", "sparsity") == "2:4"
    assert "lambada_openai ppl" in captured.out
    assert re.search(r"\| piqa\s+\|\s+4 \| acc ", captured.out)  # the zero-shot table with n
    assert (tmp_path / "r" / "report.json").is_file()
    # change one pruned weight behind sdsx.json's back: eval refuses it
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    blocks, path = find_blocks(model)
    name, lin = next(iter(find_linears(blocks[0], prefix=f"{path}.0").items()))
    W = get_weight(lin).clone()
    W[W == 0] = 0.01
    set_weight(lin, W)
    model.save_pretrained(out)
    rc = main(["eval", str(out), "--ppl", str(files / "eval.txt"), "--no-progress"])
    one_line_error(capsys.readouterr().err, rf"{re.escape(name)} no longer has the 2:4 pattern")
    assert rc == 1


def test_compare_restores_dense_weights_between_runs(files, tmp_path, capsys):
    rep = tmp_path / "cmp"
    rc = main(["compare", *base(files, "--methods", "magnitude,sparsegpt", "--sparsity", "2:4,0.5", "--report", str(rep))])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows = [l for l in captured.out.splitlines() if l.startswith("| ")][1:]
    assert len(rows) == 5  # dense + 2 methods x 2 patterns
    data = json.loads((rep / "report.json").read_text())
    assert [(r["method"], r["sparsity"]) for r in data["runs"]] == [
        ("magnitude", "2:4"), ("sparsegpt", "2:4"), ("magnitude", "0.5"), ("sparsegpt", "0.5")]
    # every run started from the dense model: exactly half the weights pruned, never more
    assert all(abs(r["overall_sparsity"] - 0.5) < 1e-3 for r in data["runs"])
    # magnitude on the dense model is deterministic: same as a fresh one-off prune
    mag24 = float(table_value(captured.out, "magnitude", "ppl eval"))
    capsys.readouterr()
    assert main(["prune", *base(files, "--method", "magnitude", "--sparsity", "2:4", "--report", str(tmp_path / "p"))]) == 0
    assert float(table_value(capsys.readouterr().out, "magnitude", "ppl eval")) == mag24
    assert (rep / "layer_errors.png").is_file() and (rep / "report.md").is_file()


def test_killed_prune_resumes_from_its_out_folder(files, tmp_path, capsys):
    """`sdsx prune --out DIR` killed mid-run (SIGKILL) leaves a checkpoint in DIR; the same command
    again resumes from it (no --overwrite needed), ends with the weights of an uninterrupted run
    and removes the checkpoint."""
    import os
    import signal

    from safetensors.torch import load_file

    args = base(files, "--method", "sds", "--dense-iters", "4", "--adjust-iters", "2", "--ppl", "none")
    whole = tmp_path / "whole"
    assert main(["prune", *args, "--out", str(whole)]) == 0
    assert not (whole / CHECKPOINT_MARKER).exists() and not (whole / "checkpoint").exists()

    out = tmp_path / "resumed"
    env = dict(os.environ, SDSX_KILL_AT="layer:9")
    # cwd outside the checkout: `python -m` puts the cwd first on sys.path, and the source tree's
    # sdsx/ (without the built extension) would shadow the installed package
    proc = subprocess.run([sys.executable, "-m", "sdsx", "prune", *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / CHECKPOINT_MARKER).is_file() and not (out / META_NAME).exists()
    capsys.readouterr()
    assert main(["prune", *[a for a in args if a != "-q"], "--out", str(out)]) == 0
    assert "restored from the checkpoint" in capsys.readouterr().err
    assert not (out / CHECKPOINT_MARKER).exists() and not (out / "checkpoint").exists()
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_distributed_prune_with_torchrun_matches_one_process(files, tmp_path, capsys):
    """`torchrun --nproc-per-node 2 -m sdsx prune --distributed` (rank 1 does phases 2/3) saves the
    same weights as the parallel schedule in one process, and cleans up its exchange folder."""
    import socket

    from safetensors.torch import load_file

    args = base(files, "--method", "sds", "--dense-iters", "4", "--adjust-iters", "2", "--ppl", "none")
    one = tmp_path / "one"
    assert main(["prune", *args, "--schedule", "parallel", "--out", str(one)]) == 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    two = tmp_path / "two"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                           "--master-port", str(port), "-m", "sdsx", "prune", *args, "--distributed", "--out", str(two)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((two / META_NAME).read_text())
    ranks = meta["report"]["parallel"]["ranks"]
    assert meta["report"]["parallel"]["world"] == 2 and ranks[1]["layers"] == 14 and ranks[0]["layers"] == 0
    assert not (two / "parallel").exists() and not (two / CHECKPOINT_MARKER).exists()


def test_checkpoint_of_another_run_is_refused(files, tmp_path, capsys):
    out = tmp_path / "other"
    stop = base(files, "--method", "wanda", "--ppl", "none")
    env_args = ["prune", *stop, "--out", str(out)]
    import os
    import signal

    proc = subprocess.run([sys.executable, "-m", "sdsx", *env_args], env=dict(os.environ, SDSX_KILL_AT="layer:3"),
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    capsys.readouterr()
    assert main(["prune", *base(files, "--method", "sparsegpt", "--ppl", "none"), "--out", str(out)]) == 1
    one_line_error(capsys.readouterr().err, r"belongs to another run: options differ \(method='wanda' there, 'sparsegpt' now[,)]")
    # --overwrite starts over
    assert main(["prune", *base(files, "--method", "sparsegpt", "--ppl", "none"), "--out", str(out), "--overwrite"]) == 0
    assert (out / META_NAME).is_file() and not (out / CHECKPOINT_MARKER).exists()


def test_same_command_twice_writes_identical_weight_files(files, tmp_path):
    """Reproducibility: the same command and seed give byte-identical weight files (sdsx.json
    differs only in its timestamp and timings)."""
    import hashlib

    digests = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["prune", *base(files, "--method", "sds", "--pruner", "wanda", "--dense-iters", "4",
                                    "--adjust-iters", "2", "--ppl", "none", "--save-masks"), "--out", str(out)]) == 0
        digests.append({f: hashlib.sha256((out / f).read_bytes()).hexdigest() for f in ("model.safetensors", "masks.safetensors")})
        meta = json.loads((out / META_NAME).read_text())
        digests[-1]["layers"] = json.dumps(meta["layers"], sort_keys=True)
    assert digests[0] == digests[1]


def test_overwrite(files, tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "something.txt").write_text("x")
    rc = main(["prune", *base(files, "--method", "magnitude", "--out", str(out), "--ppl", "none")])
    one_line_error(capsys.readouterr().err, r"output folder .*full is not empty; pass --overwrite")
    assert rc == 1 and not (out / META_NAME).exists()
    assert main(["prune", *base(files, "--method", "magnitude", "--out", str(out), "--ppl", "none", "--overwrite")]) == 0
    assert (out / META_NAME).is_file()


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "argv, code, pattern",
    [
        (["prune", "MODEL", "--sparsity", "5:4"], 2, r"argument --sparsity: invalid N:M pattern '5:4'"),
        (["prune", "MODEL", "--sparsity", "abc"], 2, r"argument --sparsity: invalid sparsity 'abc'"),
        (["prune", "MODEL", "--method", "obs"], 2, r"argument --method: invalid choice: 'obs'"),
        (["prune", "MODEL", "--nsamples", "0"], 2, r"argument --nsamples: expected a positive integer"),
        (["compare", "MODEL", "--methods", "sparsegpt,foo"], 2, r"unknown method 'foo'"),
        (["compare", "MODEL", "--sparsity", "2:4,1.5"], 2, r"pruned fraction must be in \[0, 1\)"),
        (["eval", "MODEL", "--tasks", "piqa,hellaswag"], 1, r"unknown task 'hellaswag'"),
        (["eval", "no-such-model-xyz", "--ppl", "FILE"], 1, r"unknown model 'no-such-model-xyz': not a local folder.*hub is not reachable"),
        (["eval", "./missing/folder", "--ppl", "FILE"], 1, r"model folder ./missing/folder does not exist"),
        (["prune", "MODEL", "--calib", "/nonexistent/calib.txt"], 1, r"--calib /nonexistent/calib.txt: no such file"),
        (["eval", "MODEL", "--ppl", "/nonexistent/wiki.raw"], 1, r"--ppl /nonexistent/wiki.raw: no such file"),
        (["eval", "MODEL", "--tasks", "arc_easy"], 1, r"task 'arc_easy': no arc_easy.jsonl in .*hub is not reachable"),
        (["prune", "MODEL"], 1, r"no calibration text: pass --calib"),
        (["eval", "MODEL", "--ppl", "none"], 1, r"nothing to evaluate"),
        (["prune", "MODEL", "--calib", "CALIB", "--seqlen", "100000", "--ppl", "none"], 1, r"not enough calibration text"),
        (["prune", "MODEL", "--calib", "CALIB", "--distributed"], 1, r"--distributed needs --out DIR"),
        (["prune", "MODEL", "--calib", "CALIB", "--distributed", "--method", "wanda"], 1, r"--method wanda has none"),
        (["prune", "MODEL", "--calib", "CALIB", "--distributed", "--schedule", "phased"], 1, r"not --schedule phased"),
        (["prune", "MODEL", "--calib", "CALIB", "--distributed", "--out", "OUT"], 1, r"environment that torchrun sets"),
        (["compare", "MODEL", "--calib", "CALIB", "--distributed"], 1, r"--distributed is for `sdsx prune"),
        (["prune", "MODEL", "--calib", "CALIB", "--blocks", "model.nope", "--ppl", "none"], 1,
         r'blocks="model.nope" finds nothing in LlamaForCausalLM.*model.layers'),
    ],
)
def test_bad_input_is_one_line(files, capsys, monkeypatch, argv, code, pattern):
    subs = {"MODEL": str(files / "tiny"), "FILE": str(files / "eval.txt"), "CALIB": str(files / "calib.txt"),
            "OUT": str(files / "never-written")}
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    argv = [subs.get(a, a) for a in argv] + ["--no-progress"]
    if argv[0] == "eval" and "--tasks" in argv:
        argv += ["--data-dir", str(files / "tasks")]
    assert main(argv) == code
    captured = capsys.readouterr()
    one_line_error(captured.err, pattern)
    assert captured.out == ""


def test_malformed_task_line_is_named(files, tmp_path, capsys):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "copa.jsonl").write_text(json.dumps(CHOICE_ITEMS[0]) + "\n" + '{"query": "x", "choices": ["a", "b"]}\n')
    rc = main(["eval", str(files / "tiny"), "--tasks", "copa", "--data-dir", str(tasks), "--no-progress"])
    one_line_error(capsys.readouterr().err, r"copa\.jsonl:2: needs an integer \"gold\"")
    assert rc == 1


def test_already_pruned_model_is_refused_for_pruning(files, tmp_path, capsys):
    out = tmp_path / "m"
    assert main(["prune", *base(files, "--method", "magnitude", "--out", str(out), "--ppl", "none")]) == 0
    capsys.readouterr()
    rc = main(["prune", str(out), "--calib", str(files / "calib.txt"), "--nsamples", "4", "--seqlen", "32", "--ppl", "none", "--no-progress"])
    one_line_error(capsys.readouterr().err, r"already pruned \(magnitude 2:4\)")
    assert rc == 1


def test_harness_lm_eval(files, capsys):
    import importlib.util

    argv = ["eval", str(files / "tiny"), "--tasks", "piqa", "--data-dir", str(files / "tasks"), "--harness", "lm-eval", "--no-progress", "-q"]
    if importlib.util.find_spec("lm_eval") is None:
        assert main(argv) == 1
        one_line_error(capsys.readouterr().err, r"--harness lm-eval needs lm-evaluation-harness: pip install 'sdsx\[lmeval\]'")
        return
    assert main(argv) == 0
    theirs = table_value(capsys.readouterr().out, "dense", "piqa acc_norm")
    assert main(argv[:-4] + ["--no-progress", "-q"]) == 0
    assert table_value(capsys.readouterr().out, "dense", "piqa acc_norm") == theirs


def test_logging_state_is_restored(files, capsys):
    import logging

    logger = logging.getLogger("sdsx")
    before = (logger.level, logger.propagate, list(logger.handlers))
    main(["eval", str(files / "tiny"), "--ppl", str(files / "eval.txt"), "--ppl-seqlen", "64", "--no-progress", "-v"])
    assert "perplexity on eval" in capsys.readouterr().err
    assert (logger.level, logger.propagate, list(logger.handlers)) == before


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="unknown task"):
        main(["eval", str(files / "tiny"), "--tasks", "nope", "--debug"])


def test_help_and_no_command(capsys):
    assert main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--method", "--pruner", "--sparsity", "--calib", "--nsamples", "--seqlen", "--out", "--overwrite",
                   "--ppl", "--max-windows", "--schedule", "--l1", "--l2", "--dense-iters", "--adjust-iters",
                   "--no-redense", "--no-adjust", "--tasks", "--limit", "--debug"):
        assert option in text, option
    assert "128 x 2048" in " ".join(text.split())
    assert main([]) == 2


def test_python_m_sdsx_help():
    proc = subprocess.run([sys.executable, "-m", "sdsx", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "prune" in proc.stdout and "eval" in proc.stdout and "compare" in proc.stdout
    assert "smollm2-135m" in proc.stdout


# ------------------------------------------------------------------------------------ integration
@pytest.mark.integration
def test_eval_smollm2_few_items(smollm2, capsys):
    if REAL_ZEROSHOT is None or not REAL_ZEROSHOT.is_dir():
        pytest.skip("no local zero-shot data")
    rc = main(["eval", "smollm2-135m", "--tasks", "copa,lambada_openai", "--limit", "3", "--data-dir", str(REAL_ZEROSHOT), "--no-progress", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "copa acc" in out and "lambada_openai ppl" in out


def test_prune_with_block_fit_and_mixed_or_self_calibration(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDSX_CACHE", str(tmp_path / "cache"))
    (files / "calib2.txt").write_text(TEXT[::-1] * 30, encoding="utf-8")
    args = ["prune", str(files / "tiny"), "--calib", f"{files / 'calib.txt'},{files / 'calib2.txt'}", "--nsamples", "8", "--seqlen", "32",
            "--ppl", "none", "--no-progress", "-q", "--method", "sparsegpt", "--sparsity", "2:4", "--block-fit",
            "--block-lr", "1e-3", "--block-epochs", "1", "--out", str(tmp_path / "fit")]
    assert main(args) == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "fit" / META_NAME).read_text())
    assert meta["calibration"]["nsamples"] == 8 and "," in meta["calibration"]["source"]
    run = json.loads((tmp_path / "fit" / "report" / "report.json").read_text())["runs"][0]
    assert run["options"]["block_fit"]["lr"] == 1e-3 and run["options"]["validation"] == 2  # auto: 1/8 of 8, at least 2
    assert len(run["fits"]) == len(run["blocks"]) == 2
    args_self = ["prune", str(files / "tiny"), "--calib", "self", "--nsamples", "2", "--seqlen", "16", "--ppl", "none", "--no-progress",
                 "-q", "--method", "wanda", "--sparsity", "0.5", "--report-error", "--out", str(tmp_path / "self")]
    assert main(args_self) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "self" / META_NAME).read_text())["calibration"]["source"] == "self"
    wanda_run = json.loads((tmp_path / "self" / "report" / "report.json").read_text())["runs"][0]
    assert wanda_run["options"]["report_error"] is True and wanda_run["total_error"] > 0  # asked for: the full Gram
    assert list((tmp_path / "cache" / "calib-self").glob("*.pt"))
    assert main([*args_self[:-1], str(tmp_path / "nope"), "--calib", "missing.txt,x.txt"]) == 1
    one_line_error(capsys.readouterr().err, "--calib missing.txt: no such file")


def test_prune_sds_with_another_texts_validation_and_guard_flags(files, tmp_path, capsys):
    """--other-validation FILE adds windows of that text to the validation (recorded per source);
    --no-model-guard and --deviation reach SDSOptions; a missing file is a one-line error."""
    rep = tmp_path / "rep"
    rc = main(["prune", *base(files, "--method", "sds", "--nsamples", "8", "--validation", "2", "--dense-iters", "2",
                              "--adjust-iters", "2", "--other-validation", str(files / "eval.txt"), "--no-model-guard",
                              "--deviation", "plain", "--ppl", "none", "--report", str(rep))])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    run = json.loads((rep / "report.json").read_text())["runs"][0]
    assert run["options"]["validation_sources"] == {"calibration": 2, "other": 2}
    assert run["options"]["model_guard"] is False and run["options"]["deviation"] == "plain"
    rc = main(["prune", *base(files, "--method", "sds", "--nsamples", "8", "--other-validation", str(tmp_path / "nope.txt"),
                              "--ppl", "none")])
    assert rc != 0
    one_line_error(capsys.readouterr().err, "other-validation")


# ------------------------------------------------------------------ one set of defaults (issue 27)
@pytest.mark.parametrize("method,extra", [("sparsegpt", ["--block-fit"]), ("sds", ["--pruner", "wanda"]), ("ria", [])])
def test_library_and_cli_give_the_same_weights(files, tmp_path, method, extra):
    """``sdsx prune`` and the library calls a user would write with the same settings (and their
    defaults otherwise: calibration seed and window start, the held-out windows, SDS's options)
    give the same weights bit for bit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sdsx

    out = tmp_path / "cli"
    args = base(files, "--method", method, "--sparsity", "2:4", "--nsamples", "16", "--ppl", "none", *extra)
    assert main(["prune", *args, "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(str(files / "tiny"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(files / "tiny"))
    calib = sdsx.calibration(str(files / "calib.txt"), tok, nsamples=16, seqlen=32)
    if method == "sds":
        sdsx.sds_prune(model, calib, "2:4", "wanda", progress=False)
    else:
        sdsx.prune(model, calib, method, "2:4", progress=False, block_fit="--block-fit" in extra)
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).state_dict()
    mine = model.state_dict()
    assert saved.keys() == mine.keys()
    differ = [k for k in mine if not torch.equal(saved[k], mine[k])]
    assert not differ, f"library and CLI differ in {differ[:3]}"


def test_flags_come_from_the_option_dataclasses():
    """Every field with flag metadata (SDSOptions and the RunConfig sections) is a flag of `sdsx
    prune` with its default in the help; the given flags reach the configuration (booleans both
    ways), and unset ones leave the dataclasses' defaults."""
    import dataclasses

    from sdsx.cli import _given, _option_classes, _run_config, build_parser
    from sdsx.config import ModelConfig, RunConfig
    from sdsx.pruners.sds import SDSOptions

    parser = build_parser()
    prune = parser._subparsers._group_actions[0].choices["prune"]
    text = " ".join(prune.format_help().split())
    flagged = [(c, f) for c in _option_classes() for f in dataclasses.fields(c) if "flag" in f.metadata]
    assert len(flagged) >= 35
    for cls, f in flagged:
        name = f.metadata.get("name") or f.name
        assert f"--{name.replace('_', '-')}" in text, f"{cls.__name__}.{f.name}"
    args = parser.parse_args(["prune", "m", "--reselect", "--no-keep-better", "--dense-iters", "3", "--target", "dense",
                              "--block-lr", "1e-3", "--percdamp", "0.05", "--calib", "c.txt", "--nsamples", "8",
                              "--bos", "never", "--limit", "5", "--device", "cpu"])
    assert _given(args, SDSOptions) == {"reselect": True, "keep_better": False, "dense_iters": 3, "target": "dense",
                                        "block_lr": 1e-3, "percdamp": 0.05}
    config = _run_config(args)
    assert (config.calibration.source, config.calibration.nsamples, config.calibration.seqlen) == ("c.txt", 8, 512)
    assert (config.model.bos, config.evaluation.limit, config.engine.device) == ("never", 5, "cpu")
    plain = _run_config(parser.parse_args(["prune", "m"]))
    assert plain.to_dict() == RunConfig(model=ModelConfig(name="m")).to_dict()
