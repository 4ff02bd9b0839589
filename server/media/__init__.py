"""Media helpers for the jobs: audio checks, video probing / sampled decoding, artifact writers.

Import the submodules directly (``server.media.video_reader``, ``server.media.video_writers``,
``server.media.audio``); PyAV is optional, so nothing here imports it eagerly.
"""
