"""The HTTP inference server: validation, dynamic batching, metrics."""
