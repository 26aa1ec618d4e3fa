"""FineStyle: fine-grained, controllable style personalization for Stable Diffusion.

The library is pure functions and small classes, one module per concern (config, models, images,
concepts, captioning, dataset, training, merge, export, runtime, server, cli). It never imports
Prefect; the `flows/` package wraps it. Importing it sets nothing global.
"""

__version__ = "0.1.0"
