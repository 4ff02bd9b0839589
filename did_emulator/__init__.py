"""A local stand-in for the D-ID talks API: real HTTP, real mp4 results, injectable faults.

handle = start_emulator("127.0.0.1", 0, api_key="test-key")
... DIDClient(handle.url, "test-key") ...
handle.stop()
"""

from did_emulator.server import EmulatorHandle, EmulatorServer, start_emulator

__all__ = ["EmulatorHandle", "EmulatorServer", "start_emulator"]
