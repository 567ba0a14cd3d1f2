"""Field metadata that gives an option dataclass's field its command-line flag: the options
(:class:`~sdsx.pruners.sds.SDSOptions`, the sections of :class:`~sdsx.config.RunConfig`) are the one
home of each option's default and help, and the command line builds its flags from them."""

from __future__ import annotations

from typing import Any

__all__ = ["KINDS", "flag"]

#: how a flag's text becomes a value: a positive int, any int, a finite float >= 0, any float, text
KINDS = ("positive", "int", "nonneg", "float", "str")


def flag(text: str, group: str = "sds", choices: tuple[str, ...] | None = None, *, kind: str | None = None,
         metavar: str | None = None, name: str | None = None) -> dict[str, Any]:
    """Metadata for ``dataclasses.field``: ``text`` is the flag's help (the default is appended from
    the dataclass), ``group`` its section of ``--help``, ``choices`` its allowed values, ``kind``
    how its text is read (:data:`KINDS`; default from the field's default value), ``metavar`` its
    placeholder and ``name`` the flag when it is not ``--field-name`` (also the argparse dest)."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {"flag": text, "group": group, "choices": choices, "kind": kind, "metavar": metavar, "name": name}
