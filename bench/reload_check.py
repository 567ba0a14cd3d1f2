"""Perplexity of a saved pruned model folder, loaded twice: with plain transformers
(AutoModelForCausalLM.from_pretrained) and with sdsx.load (which also checks the stored pattern).
The two must agree: the saved folder is a standard Hugging Face model.

    python bench/reload_check.py runs/demo [--text ../shared/data/wikitext2/wiki.test.raw] [--max-windows 8]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder written by sdsx prune --out / sdsx.save_pruned")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=8)
    args = p.parse_args(argv)
    if not args.text.is_file():
        p.error(f"--text {args.text} does not exist")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sdsx
    from sdsx.data import load_text

    tok = AutoTokenizer.from_pretrained(args.folder)
    text = load_text(str(args.text))
    kw = dict(seqlen=args.seqlen, max_windows=args.max_windows, progress=False)
    plain = sdsx.perplexity(AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32), text, tok, **kw)
    loaded = sdsx.load(args.folder)
    ours = sdsx.perplexity(loaded[0] if isinstance(loaded, tuple) else loaded, text, tok, **kw)
    print(f"plain transformers: {plain:.6f}\nsdsx.load:          {ours:.6f}\nidentical: {plain == ours}")
    return 0 if plain == ours else 1


if __name__ == "__main__":
    raise SystemExit(main())
