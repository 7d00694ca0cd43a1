"""One small interface over the runtimes that execute an exported ESC model."""
