"""sdsx.run(config): the whole job as one library call, its configuration (checked, saved, read
back), and the command line that only parses its flags into one."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import base, files, hermetic  # noqa: F401  (fixtures: a tiny model folder with its tokenizer and texts)

import sdsx
from sdsx.cli import main
from sdsx.config import CONFIG_NAME, CalibrationConfig, EvalConfig, MethodConfig, ModelConfig, OutputConfig, RunConfig


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same(a, b) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"weights differ in {differ[:3]}"


def _config(root, out, method: MethodConfig) -> RunConfig:
    return RunConfig(
        model=ModelConfig(name=str(root / "tiny")),
        calibration=CalibrationConfig(source=str(root / "calib.txt"), nsamples=16, seqlen=32),
        method=method,
        evaluation=EvalConfig(ppl=str(root / "eval.txt"), ppl_seqlen=64),
        output=OutputConfig(out=str(out)),
    ).replace(engine={"progress": False})


@pytest.mark.parametrize("method,flags", [
    (MethodConfig("sds", pruner="wanda", sparsity="2:4"), ["--method", "sds", "--pruner", "wanda"]),
    (MethodConfig("sparsegpt", sparsity="0.5", block_fit=True), ["--method", "sparsegpt", "--sparsity", "0.5", "--block-fit"]),
])
def test_run_reproduces_sdsx_prune(files, tmp_path, method, flags):  # noqa: F811
    """sdsx.run and sdsx prune with the same settings: the same weights, the same table."""
    result = sdsx.run(_config(files, tmp_path / "lib", method))
    assert main(["prune", *base(files, "--nsamples", "16", *flags), "--out", str(tmp_path / "cli")]) == 0
    _same(tmp_path / "lib", tmp_path / "cli")
    assert [r["method"] for r in result.rows] == ["dense", method.full_name]
    assert result.report.method == method.full_name and result.out == tmp_path / "lib"
    assert not (tmp_path / "lib" / "checkpoint").exists(), "the checkpoint is removed once the model is saved"
    cli_saved = RunConfig.load(tmp_path / "cli" / CONFIG_NAME)
    assert cli_saved.method == method, "sdsx prune parsed its flags into the same method configuration"


def test_saved_configuration_runs_again_to_the_same_weights(files, tmp_path):  # noqa: F811
    assert main(["prune", *base(files, "--method", "sds", "--sparsity", "2:4", "--nsamples", "16"), "--out", str(tmp_path / "a")]) == 0
    saved = tmp_path / "a" / CONFIG_NAME
    assert saved.is_file() and (tmp_path / "a" / "report" / CONFIG_NAME).is_file()
    assert main(["run", str(saved), "--out", str(tmp_path / "b"), "--no-progress", "-q"]) == 0
    _same(tmp_path / "a", tmp_path / "b")
    assert json.loads((tmp_path / "b" / CONFIG_NAME).read_text())["output"]["out"] == str(tmp_path / "b")


def test_configuration_round_trips(tmp_path):
    config = RunConfig(method=MethodConfig("ria", sparsity="0.5", pruner_options={"alpha": 0.25}, validation=4),
                       calibration=CalibrationConfig(nsamples=64, seed=3))
    path = config.save(tmp_path / "c.json")
    assert RunConfig.load(path) == config
    assert RunConfig.from_dict(json.loads(path.read_text())) == config
    yaml = pytest.importorskip("yaml")
    ypath = config.save(tmp_path / "c.yaml")
    assert yaml.safe_load(ypath.read_text())["method"]["name"] == "ria"
    assert RunConfig.load(ypath) == config


def test_defaults_are_the_librarys():
    from sdsx.defaults import CALIB_NSAMPLES, CALIB_SEQLEN

    c = RunConfig()
    assert (c.calibration.nsamples, c.calibration.seqlen) == (CALIB_NSAMPLES, CALIB_SEQLEN)
    assert c.method.full_name == "sds-sparsegpt" and c.method.sparsity == "2:4" and c.method.validation == "auto"
    assert c.validate() is c


@pytest.mark.parametrize("change,message", [
    ({"method": {"name": "obs"}}, "method.name must be one of sds, magnitude, wanda, sparsegpt, ria"),
    ({"method": {"pruner": "magnitude"}}, "method.pruner must be one of"),
    ({"method": {"sparsity": "5:4"}}, "5:4"),
    ({"method": {"options": {"l3": 1}}}, "method.options has no field 'l3'"),
    ({"method": {"name": "ria", "pruner_options": {"beta": 1}}}, "ria has no option 'beta'"),
    ({"method": {"validation": -1}}, "method.validation must be"),
    ({"calibration": {"nsamples": 0}}, "calibration.nsamples must be a positive int"),
    ({"model": {"bos": "sometimes"}}, "model.bos must be one of auto, always, never"),
    ({"engine": {"distributed": True}, "output": {"out": None}}, "engine.distributed needs output.out"),
    ({"engine": {"distributed": True}, "method": {"name": "wanda"}}, "method wanda has none"),
])
def test_bad_configuration_is_one_error_and_writes_nothing(tmp_path, change, message):
    out = tmp_path / "out"
    config = RunConfig().replace(output={"out": str(out)}).replace(**change)
    with pytest.raises((ValueError, TypeError), match=message):
        sdsx.run(config)
    assert not out.exists()


def test_unknown_sections_and_fields_are_named(tmp_path):
    with pytest.raises(ValueError, match="unknown configuration section 'modle'"):
        RunConfig.from_dict({"modle": {}})
    with pytest.raises(ValueError, match="section 'method' has no field 'sparsit'; its fields: name, pruner, sparsity"):
        RunConfig.from_dict({"method": {"sparsit": "2:4"}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid configuration file"):
        RunConfig.load(bad)
    assert main(["run", str(tmp_path / "missing.json")]) == 1


def test_compare_and_evaluate_as_library_calls(files, tmp_path):  # noqa: F811
    """sdsx.commands.compare prunes each method from the same dense weights (a method run alone by
    sdsx.run gives the same perplexity), and evaluate scores a saved folder."""
    from sdsx.commands import compare, evaluate

    config = _config(files, tmp_path / "unused", MethodConfig("wanda", sparsity="2:4")).replace(output={"report": str(tmp_path / "cmp")})
    methods = [MethodConfig("magnitude", sparsity="0.5"), MethodConfig("wanda", sparsity="2:4")]
    result = compare(config, methods)
    assert [r["method"] for r in result.rows] == ["dense", "magnitude", "wanda"]
    assert (result.report_dir / "report.json").is_file()
    alone = sdsx.run(_config(files, tmp_path / "wanda", MethodConfig("wanda", sparsity="2:4")))
    key = next(k for k in alone.rows[-1] if k.startswith("ppl "))
    assert result.rows[2][key] == pytest.approx(alone.rows[-1][key], rel=1e-6)
    ev = evaluate(config.replace(model={"name": str(tmp_path / "wanda")}, output={"report": None}))
    assert ev.rows[0]["method"] == "wanda" and ev.rows[0][key] == pytest.approx(alone.rows[-1][key], rel=1e-6)
    with pytest.raises(ValueError, match="method.options has no field 'nope'"):
        compare(config, [MethodConfig("wanda", options={"nope": 1})])
