"""The training loop and what it needs: engine, pipeline, losses, optimiser, added training folders."""
