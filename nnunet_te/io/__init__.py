"""Files: atomic writes, content hashes, and reading checkpoints without executing them."""
