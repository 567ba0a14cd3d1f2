"""The configuration of a whole job (:func:`sdsx.run`): typed, checked before any work, saved with
every run, and read back to run it again.

    config = RunConfig(model=ModelConfig("smollm2-135m"), method=MethodConfig("sds", sparsity="2:4"),
                       output=OutputConfig(out="runs/sds24"))
    result = sdsx.run(config)
    RunConfig.load("runs/sds24/run-config.json")   # the same job, to run again

Each section is a dataclass whose defaults are the library's (:mod:`sdsx.defaults`,
:class:`~sdsx.pruners.sds.SDSOptions`, the registered pruners' options), so ``sdsx prune`` with no
flags, ``sdsx.run(RunConfig())`` and a saved configuration all mean the same job. The command line
only parses its flags into a :class:`RunConfig`.

Files: JSON (``.json``), or YAML (``.yaml`` / ``.yml``) when PyYAML is installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdsx.defaults import CALIB_NSAMPLES, CALIB_SEQLEN
from sdsx.flags import flag

__all__ = [
    "CONFIG_NAME", "BOS_MODES", "CalibrationConfig", "EngineConfig", "EvalConfig", "MethodConfig", "ModelConfig", "OutputConfig",
    "RunConfig",
]

CONFIG_NAME = "run-config.json"  # what a run saves in its output and report folders
BOS_MODES = ("auto", "always", "never")  # sdsx.data.bos.BOS_MODES (not imported: it would import torch)
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("interleaved", "phased", "parallel")
HARNESSES = ("sdsx", "lm-eval")


@dataclass
class ModelConfig:
    """name: a built-in offline model (smollm2-135m, gemma3-270m), a local folder or a hub name.
    dtype: the parameters' dtype once loaded (statistics are fp32 anyway).
    blocks: the dotted path to the decoder blocks, for a layout sdsx does not know.
    bos: how calibration and perplexity windows and zero-shot contexts start (sdsx.data.bos).
    """

    name: str = "smollm2-135m"
    dtype: str = field(default="float32", metadata=flag(
        "parameter dtype of the loaded model (statistics are fp32 anyway)", "engine", DTYPES))
    blocks: str | None = field(default=None, metadata=flag(
        "where the decoder blocks are, for a model whose layout sdsx does not know: the dotted attribute path from "
        "the model to their nn.ModuleList (e.g. model.layers)", "calibration", kind="str", metavar="PATH"))
    bos: str = field(default="auto", metadata=flag(
        "how calibration and perplexity windows and zero-shot contexts start: auto: with the tokenizer's BOS token "
        "where the tokenizer starts texts with it (Gemma, LLaMA-2, OPT), a window then holding BOS + L-1 text tokens; "
        "always: with BOS for any tokenizer; never: windows cut from one token stream (the published SparseGPT/Wanda "
        "protocol)", "evaluation", BOS_MODES))


@dataclass
class CalibrationConfig:
    """source: a text file, several comma-separated, a hub dataset name, or "self" (sampled from the
    dense model); None: the speeches under $SDSX_DATA (calib/sotu_1990_2021.txt).
    nsamples, seqlen: windows and tokens per window; seed: which windows.
    """

    source: str | None = field(default=None, metadata=flag(
        "calibration text: a .txt / .jsonl (\"text\" field) / WikiText .raw file, or a hub dataset (c4, wikitext2, ptb; "
        "needs network); several, comma-separated, are mixed evenly; 'self' samples the sequences from the dense model "
        "itself (seeded, cached). Default: $SDSX_DATA/calib/sotu_1990_2021.txt (State of the Union addresses) when it "
        "exists", "calibration", kind="str", metavar="SOURCE", name="calib"))
    nsamples: int = field(default=CALIB_NSAMPLES, metadata=flag(
        "calibration sequences (the paper uses 128 x 2048 tokens of C4)", "calibration", metavar="N"))
    seqlen: int = field(default=CALIB_SEQLEN, metadata=flag(
        "tokens per calibration sequence (the paper uses 2048)", "calibration", metavar="L"))
    seed: int = field(default=0, metadata=flag("seed of the calibration windows", "calibration", kind="int"))


@dataclass
class MethodConfig:
    """name: "sds" or a registered pruner (sdsx.pruners.registry: magnitude, wanda, sparsegpt, ria).
    pruner: SDS's phase-1/3 pruner. sparsity: "2:4", "4:8", a fraction such as 0.5 or "50%".
    schedule: SDS's schedule (None: interleaved; parallel with ``engine.distributed``).
    validation: windows held out for the guards and the block fit: "auto", a count, a fraction or 0.
    other_validation: SDS's validation from another domain: "self", "none" or a text file.
    options: SDSOptions fields to override (SDS; for the other methods ``blocksize``, ``percdamp``
        and the block fit's ``block_lr``, ``block_epochs``, ``block_target`` are read from here).
    pruner_options: the pruner's own registered options (e.g. {"alpha": 0.5} for RIA).
    block_fit: the block fit on (True) or off (False); None: SDS's default (on), off for the others.
    report_error: every layer's error tr(D H D^T) in the report (None: where it costs nothing).
    early_exit_params: SDS skips the adjustment for models with more parameters than this.
    """

    name: str = "sds"
    pruner: str = "sparsegpt"
    sparsity: str = "2:4"
    schedule: str | None = None
    validation: str | int | float = "auto"
    other_validation: str = "self"
    options: dict[str, Any] = field(default_factory=dict)
    pruner_options: dict[str, Any] = field(default_factory=dict)
    block_fit: bool | None = None
    report_error: bool | None = None
    early_exit_params: float = 3e9

    @property
    def full_name(self) -> str:
        """sds-<pruner> for SDS, else the pruner's name."""
        return f"sds-{self.pruner}" if self.name == "sds" else self.name

    @property
    def pruner_in_use(self) -> str:
        return self.pruner if self.name == "sds" else self.name


@dataclass
class EvalConfig:
    """ppl: the perplexity text (a file or a hub name); "none" skips it; None: WikiText-2's test file
    under $SDSX_DATA when it exists. ppl_seqlen: the window; max_windows: score only the first K.
    tasks: zero-shot tasks, comma-separated ("all" for every one); limit: items per task.
    data_dir: where the task files are; harness: "sdsx" or "lm-eval"; batch_size: zero-shot batch.
    """

    ppl: str | None = None
    ppl_seqlen: int = field(default=2048, metadata=flag(
        "perplexity window in tokens (capped at the model's limit; SparseGPT/Wanda protocol)", "evaluation", metavar="L"))
    max_windows: int | None = field(default=None, metadata=flag(
        "score only the first K perplexity windows (a quick check; default all)", "evaluation", kind="positive", metavar="K"))
    tasks: str | None = field(default=None, metadata=flag(
        "zero-shot tasks, comma-separated: piqa, arc_easy, openbook_qa, copa, winogrande, lambada_openai, or 'all'; an "
        "entry may also be a path to a .jsonl file (default none)", "evaluation", kind="str", metavar="LIST"))
    limit: int | None = field(default=None, metadata=flag(
        "evaluate only the first K items of each zero-shot task (default all)", "evaluation", kind="positive", metavar="K"))
    data_dir: str | None = field(default=None, metadata=flag(
        "folder holding <task>.jsonl (default $SDSX_DATA/zeroshot, else ../shared/data/zeroshot next to the checkout)",
        "evaluation", kind="str", metavar="DIR"))
    harness: str = field(default="sdsx", metadata=flag(
        "zero-shot evaluator: sdsx's built-in one (lm-evaluation-harness's definitions) or lm-evaluation-harness itself "
        "on the same task files (needs pip install 'sdsx[lmeval]')", "evaluation", HARNESSES))
    batch_size: int = field(default=8, metadata=flag(
        "sequences per forward call in zero-shot evaluation (perplexity runs one window at a time)", "evaluation", metavar="B"))


@dataclass
class OutputConfig:
    """out: the folder for the pruned model (and the checkpoint a killed run resumes from); None:
    the model is not saved. report: the report folder (None: OUT/report, else sdsx-runs/<time>-...).
    save_masks: also save the keep-masks; overwrite: allow a non-empty ``out``.
    """

    out: str | None = None
    report: str | None = None
    save_masks: bool = False
    overwrite: bool = False


@dataclass
class EngineConfig:
    """device: cpu, cuda, cuda:N (None: cuda when available); progress: progress bars;
    distributed: spread SDS's phases 2-3 over the ranks of a torchrun launch (needs ``out``)."""

    device: str | None = field(default=None, metadata=flag(
        "where to run: cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)", "engine", kind="str"))
    progress: bool = True
    distributed: bool = False


_SECTIONS = {
    "model": ModelConfig, "calibration": CalibrationConfig, "method": MethodConfig,
    "evaluation": EvalConfig, "output": OutputConfig, "engine": EngineConfig,
}


@dataclass
class RunConfig:
    """One job: model, calibration, method, evaluation, output and engine (see each section)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    # ------------------------------------------------------------------------------ checking
    def validate(self) -> RunConfig:
        """Check every setting that can be checked without loading the model or the data; raise one
        ValueError (or TypeError) that names the setting and the fix. Returns self."""
        m, c, e = self.method, self.calibration, self.evaluation
        _choice("model.dtype", self.model.dtype, DTYPES)
        _choice("model.bos", self.model.bos, BOS_MODES)
        for name, value in (("calibration.nsamples", c.nsamples), ("calibration.seqlen", c.seqlen),
                            ("evaluation.ppl_seqlen", e.ppl_seqlen), ("evaluation.batch_size", e.batch_size)):
            _positive_int(name, value)
        for name, value in (("evaluation.max_windows", e.max_windows), ("evaluation.limit", e.limit)):
            if value is not None:
                _positive_int(name, value)
        if isinstance(c.seed, bool) or not isinstance(c.seed, int):
            raise TypeError(f"calibration.seed must be an int, got {c.seed!r}")
        _choice("evaluation.harness", e.harness, HARNESSES)
        self._validate_method()
        if self.engine.distributed:
            if m.name != "sds":
                raise ValueError(f"engine.distributed spreads SDS's phases 2 and 3 over ranks; method {m.name} has none (use sds)")
            if m.schedule not in (None, "parallel"):
                raise ValueError(f"engine.distributed runs the parallel schedule, not {m.schedule}")
            if self.output.out is None:
                raise ValueError("engine.distributed needs output.out: the ranks exchange layers through it")
        return self

    def _validate_method(self) -> None:
        from sdsx.pruners import registry
        from sdsx.pruners.spec import SparsitySpec

        m = self.method
        choices = ("sds",) + registry.names()
        _choice("method.name", m.name, choices)
        if m.name == "sds":
            _choice("method.pruner", m.pruner, registry.sds_names())
        SparsitySpec.parse(m.sparsity)
        if m.schedule is not None:
            _choice("method.schedule", m.schedule, SCHEDULES)
        _validation_value(m.validation)
        if not isinstance(m.options, dict) or not isinstance(m.pruner_options, dict):
            raise TypeError("method.options and method.pruner_options must be dicts of option names to values")
        from sdsx.pruners.sds import SHARED_PRUNER_FIELDS, SDSOptions

        known = {f.name for f in dataclasses.fields(SDSOptions)} - {"pruner", "pruner_options"}
        unknown = sorted(set(m.options) - known)
        if unknown:
            raise ValueError(f"method.options has no field {unknown[0]!r}; the fields: {', '.join(sorted(known))}")
        opts = dict(m.options)
        if m.name == "sds":
            if m.block_fit is not None:
                opts["block_fit"] = m.block_fit
            SDSOptions(pruner=m.pruner, pruner_options=m.pruner_options or None, **opts).validate()
        else:
            registry.make_options(registry.get(m.name), m.pruner_options)
            SDSOptions(**{k: v for k, v in opts.items() if k.startswith("block_") or k in SHARED_PRUNER_FIELDS}).validate()
        if not isinstance(m.early_exit_params, (int, float)) or math.isnan(m.early_exit_params):
            raise ValueError(f"method.early_exit_params must be a number, got {m.early_exit_params!r}")

    # --------------------------------------------------------------------------- serialising
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """The configuration a dict describes (as :meth:`to_dict` writes it); an unknown section or
        field is refused with the known ones named."""
        if not isinstance(data, dict):
            raise TypeError(f"a run configuration is a mapping of sections, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown configuration section {unknown[0]!r}; the sections: {', '.join(_SECTIONS)}")
        sections = {}
        for name, kind in _SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                raise TypeError(f"configuration section {name!r} must be a mapping, got {type(values).__name__}")
            known = [f.name for f in dataclasses.fields(kind)]
            bad = sorted(set(values) - set(known))
            if bad:
                raise ValueError(f"configuration section {name!r} has no field {bad[0]!r}; its fields: {', '.join(known)}")
            sections[name] = kind(**values)
        return cls(**sections)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the configuration to ``path`` (JSON, or YAML for .yaml / .yml); atomically."""
        p = Path(path).expanduser()
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.suffix.lower() in (".yaml", ".yml"):
            text = _yaml().safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=1) + "\n"
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        """Read a configuration file written by :meth:`save` (or by hand); checked by :meth:`validate`."""
        p = Path(path).expanduser()
        if p.is_dir() and (p / CONFIG_NAME).is_file():
            p = p / CONFIG_NAME  # a run's output folder
        if not p.is_file():
            raise FileNotFoundError(f"no run configuration at {p}")
        text = p.read_text(encoding="utf-8")
        try:
            data = _yaml().safe_load(text) if p.suffix.lower() in (".yaml", ".yml") else json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{p} is not a valid configuration file: {exc}") from None
        return cls.from_dict(data).validate()

    def replace(self, **sections: Any) -> RunConfig:
        """A copy with whole sections replaced, or fields of them: ``replace(output={"out": "x"})``."""
        data = self.to_dict()
        for name, values in sections.items():
            if name not in _SECTIONS:
                raise ValueError(f"unknown configuration section {name!r}; the sections: {', '.join(_SECTIONS)}")
            data[name] = dict(data[name], **(asdict(values) if dataclasses.is_dataclass(values) else values))
        return RunConfig.from_dict(data)


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:
        raise ImportError("YAML configuration files need PyYAML (pip install pyyaml); or use a .json file") from None
    return yaml


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _validation_value(value: Any) -> None:
    if value == "auto" or value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (isinstance(value, float) and not value < 1 and value != int(value)):
        raise ValueError(f"method.validation must be 'auto', a count of sequences, a fraction in (0, 1) or 0, got {value!r}")
