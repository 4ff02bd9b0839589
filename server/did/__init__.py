"""D-ID talks API: an async client with classified errors and retries."""

from server.did.client import TERMINAL_STATUSES, DIDClient, Talk, TalkStatus
from server.did.errors import API_KEY_ENV, DIDError, ErrorClass

__all__ = ["API_KEY_ENV", "TERMINAL_STATUSES", "DIDClient", "DIDError", "ErrorClass", "Talk", "TalkStatus"]
