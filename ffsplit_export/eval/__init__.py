"""Evaluation: perplexity and WER (PyTorch or ONNX Runtime), reports and plots."""
