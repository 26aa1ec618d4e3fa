"""Stage 2: LoRA on the UNet's cross-attention K/V (or other presets) from a prepared dataset."""
