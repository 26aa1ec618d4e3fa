"""Inference from an export (onnxruntime, TensorRT) or a model folder (torch), with style guidance."""
