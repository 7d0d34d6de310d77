"""Serving on CPU: the ONNX export, its int8 form and ONNX Runtime as a runtime."""
