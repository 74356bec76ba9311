"""A loopback emulator of the Gemini API (Files API, generateContent, countTokens, streaming,
the Batch API, context caching) faithful enough that the real google-genai SDK cannot tell the difference.

    from tests.emulator import Emulator, Fault

    with Emulator(api_key="test-key") as emu:
        client = genai.Client(api_key="test-key",
                              http_options=types.HttpOptions(base_url=emu.base_url))

See tests/emulator/server.py for the full API and /work/shared/gemini-api.md for the protocol.
"""

from .batches import Batch, BatchRequest
from .caches import CachedContent
from .faults import ApiError, Fault
from .files import Clock, StoredFile
from .generate import DEFAULT_SUPPORTED_MIME_TYPES, GenerateRecord, PartRecord, probe_duration
from .server import ChunkLog, Emulator, RequestLog, Stats
from .speech import Segment, analyse_audio

__all__ = ["ApiError", "Batch", "BatchRequest", "CachedContent", "ChunkLog", "Clock",
           "DEFAULT_SUPPORTED_MIME_TYPES", "Emulator", "Fault", "GenerateRecord", "PartRecord", "RequestLog",
           "Segment", "Stats", "StoredFile", "analyse_audio", "probe_duration"]
