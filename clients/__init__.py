"""Framewise client SDK (typed async stubs wrapper) and the `framewise` CLI."""

from clients.sdk import FramewiseClient

__all__ = ["FramewiseClient"]
