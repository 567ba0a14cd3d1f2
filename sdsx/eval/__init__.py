"""Evaluation: perplexity (SparseGPT/Wanda protocol)."""

from sdsx.eval.perplexity import perplexity, window_nll

__all__ = ["perplexity", "window_nll"]
