"""Shared foundations: errors, environment, files, model loading, geometry, onnxruntime helpers.

Imports nothing else of finestyle.
"""
