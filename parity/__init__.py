"""SAMURAI parity suite (``make parity``, run in ``.venv-export``; not part of ``make test``).

``parity.run`` builds the reference SAMURAI video predictor of the ``sam2`` package
(absolutely-not-samurai) with seeded random weights, exports the four SAM 2 parts from that very
model instance (engines/export/sam2_parts.py), checks each part against PyTorch, then tracks a
real clip twice: with the reference predictor, and with our orchestrator's VideoPredictor
(server/sam2/video_predictor.py) over those ONNX parts served by a real Triton. It compares every
frame (chosen candidate, mask IoU, Kalman state, memory and pointer frames) and writes
bench/results/parity.json and bench/results/parity.md.
"""
