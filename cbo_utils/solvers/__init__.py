"""Solvers of the block-removal problem and their one result table."""
