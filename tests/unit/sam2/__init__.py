"""Unit tests of server/sam2, one file per module (prompts, session, session_registry,
frame_calls, video_predictor's helpers) and per module of server/sam2/samurai
(test_samurai_*.py; test_samurai.py: the package as a whole)."""
