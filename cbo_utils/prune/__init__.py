"""From a selection to files: export and verification, checkpoint-file pruning, distillation."""
