"""A loopback emulator of the Gemini API (Files API, generateContent, countTokens, streaming)
faithful enough that the real google-genai SDK cannot tell the difference.

    from tests.emulator import Emulator, Fault

    with Emulator(api_key="test-key") as emu:
        client = genai.Client(api_key="test-key",
                              http_options=types.HttpOptions(base_url=emu.base_url))

See tests/emulator/server.py for the full API and /work/shared/gemini-api.md for the protocol.
"""

from .faults import ApiError, Fault
from .files import Clock, StoredFile
from .generate import DEFAULT_SUPPORTED_MIME_TYPES, GenerateRecord, PartRecord, probe_duration
from .server import ChunkLog, Emulator, RequestLog, Stats

__all__ = ["ApiError", "ChunkLog", "Clock", "DEFAULT_SUPPORTED_MIME_TYPES", "Emulator", "Fault",
           "GenerateRecord", "PartRecord", "RequestLog", "Stats", "StoredFile", "probe_duration"]
