"""The paper's tables and figures, drawn from result files only."""
