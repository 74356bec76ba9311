"""Files that survive a crash whole or not at all: one durable write (temporary name in the same folder, fsync,
rename, fsync of the folder) and one sweep of the temporaries a killed write leaves behind. Every file the daemon
produces (compact copies, result files) is written this way."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

FILE_MODE = 0o640  # the daemon's group reads what it writes; nobody else does
MAX_STEM_BYTES = 150  # a temporary name stays under the 255-byte limit


def replace(temporary: Path, destination: Path) -> int:
    """fsync `temporary`, rename it over `destination`, fsync the folder: after a power cut the destination holds
    the old file or the whole new one. Returns the size written."""
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
        size = os.fstat(handle.fileno()).st_size
    os.replace(temporary, destination)
    _sync_folder(destination.parent)
    return size


def write(path: Path, data: bytes, *, marker: str, mode: int = FILE_MODE) -> None:
    """Write `data` to `path` durably; the temporary is hidden and named with `marker`, so `sweep` finds it."""
    stem = path.name.encode()[:MAX_STEM_BYTES].decode("utf-8", "ignore")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{stem}{marker}", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # mkstemp makes 0600; set the mode before the name appears
            handle.write(data)
        replace(Path(temporary), path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def sweep(folder: Path, marker: str) -> list[Path]:
    """Delete the hidden temporaries (`.NAME<marker>...`) a write killed midway left in `folder`; call at start."""
    if not folder.is_dir():
        return []
    stale = [path for path in folder.glob(f".*{marker}*") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # makes the rename itself survive a power cut
    finally:
        os.close(descriptor)
