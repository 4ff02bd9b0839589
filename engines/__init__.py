"""Model repository builders for Framewise (CPU: Triton python backend + ONNX Runtime, or OpenVINO for the real SAM 2 parts in bf16)."""
