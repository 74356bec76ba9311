"""A binary file that reports how many bytes have been read from it: handed to the SDK's upload (which reads it
in chunks of up to 8 MB, each sent at once) so an upload's progress can be shown. Pure I/O; imports nothing of
the daemon's."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import BinaryIO


class CountingReader(io.BufferedIOBase):
    """Reads through to `stream` and calls `report` with the total read so far after each read that returned
    bytes. Seekable (the SDK measures the file by seeking to its end and back); a seek does not count."""

    def __init__(self, stream: BinaryIO, report: Callable[[int], None]) -> None:
        super().__init__()
        self._stream = stream
        self._report = report
        self.total = 0

    @property
    def mode(self) -> str:
        return "rb"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        block = self._stream.read(-1 if size is None else size)
        if block:
            self.total += len(block)
            self._report(self.total)
        return block

    def read1(self, size: int = -1, /) -> bytes:
        return self.read(size)

    def seek(self, offset: int, whence: int = io.SEEK_SET, /) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()
