"""Training: model (backbone + heads), losses registry, the accelerate loop."""
