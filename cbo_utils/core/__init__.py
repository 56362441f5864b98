"""Artifacts, tables, profiles and the package's import graph: what every other layer builds on."""
