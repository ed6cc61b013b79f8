"""Model loading, architecture data, checkpoints."""
