"""Stage 3: merge the adapter, prove the merge, export ONNX (or TensorRT) and verify parity."""
