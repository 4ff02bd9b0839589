"""Model repository builders for Framewise (CPU: Triton python backend + ONNX Runtime, or OpenVINO for the real SAM 2 parts in bf16).

- ``cpu_repository`` writes the CPU repository (``build_engines.py --target cpu``); ``cpu_tuning``
  picks each model's instances, threads and runtime for the machine; ``python_backend/`` is the
  generic Triton model that serves every ONNX file; ``onnx_wrap`` puts YOLOv8's preprocessing in
  its graph.
- Graph rewrites served only when they keep the outputs (``onnx_graph`` holds their shared wiring):
  ``softmax_axis`` (an inner-axis Softmax on the last axis: YOLOv8's box head), ``value_fold`` and
  ``attention_fusion`` (the SAM 2 memory attention).
- ``export/`` exports the real networks to ONNX; ``sam2_standin/`` builds the stand-in SAM 2 parts;
  ``sam2_steps`` the step ensembles; ``tensorrt_build`` the GPU repository's plans.
"""
