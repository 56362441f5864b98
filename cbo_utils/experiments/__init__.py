"""The stages and experiments that the notebooks and make targets run."""
