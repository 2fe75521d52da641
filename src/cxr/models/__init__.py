"""The networks: the backbone registry, the classifier built on it, weights files, checkpoints."""
