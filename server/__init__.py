"""Framewise orchestrator: the gRPC service in front of Triton.

One hop per concern: proto (framewise.v1) -> servicers/ -> pipelines/ (SAM 2: sam2/) -> triton/ -> Triton.
"""

__version__ = "0.1.0"
