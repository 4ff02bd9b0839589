"""Model repository builders for Framewise (CPU: Triton python backend + ONNX Runtime)."""
