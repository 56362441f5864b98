"""Models: loading, tiny and stand-in models, block adapters and gates, the loss of a model with blocks removed."""
