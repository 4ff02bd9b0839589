"""Exporters from real checkpoints to ONNX (build_engines.py --target onnx).

The export path only: torch, ultralytics, sam2 and friends are imported inside the exporter
functions, never at import time of this package, and never by the orchestrator. ``checks`` holds
the shared onnx.checker + ONNX Runtime vs PyTorch comparison.

``sam2_parts``: the four SAM 2.1 parts (SAMURAI fork, module ``sam2``) with the exact contract of
the CPU stand-ins (the model contract (README.md, "The model contract")): ``export_parts(output, checkpoint=... | random_init=True)``
for build_engines.py, ``export_model(model, output)`` to export a model instance you already hold
(the parity suite, parity/run.py), ``python -m engines.export.sam2_parts`` from the command line.
``build_engines.py --target cpu --sam2-onnx-dir DIR`` serves such a folder instead of the stand-ins.
"""
