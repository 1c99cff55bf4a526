"""Training: config, model, losses, curriculum, engine, checkpoints, tracking, CLI."""
