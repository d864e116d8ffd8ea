"""Inference: scoring decoded images on Keras or ONNX Runtime, the out-of-distribution check,
export and Grad-CAM."""
