"""Measurements of a (pruned) model: perplexity, lm-eval, reasoning, efficiency."""
