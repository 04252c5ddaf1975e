"""Precision and quantization: methods, measured candidates (``sureserve quantize``)."""
