"""File modes and writes for what the project makes for others to use (engines, calibration files)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_mode(directory: bool = False) -> int:
    """The mode ``os.makedirs`` or ``open`` would give: 0777/0666 less the umask. ``mkdtemp``,
    ``mkstemp`` and safetensors create private files and folders; what is meant to be shared gets this."""
    umask = os.umask(0)  # the only way to read the umask is to set it; restored at once
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` with safetensors beside ``path`` and rename the file over it, so an interrupted
    save never leaves half a file. safetensors writes 0600; a calibration file is meant to be shared, so
    it gets what ``open`` would give."""
    from safetensors.torch import save_file

    path = Path(path)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=metadata)
        os.chmod(staging, default_mode())
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
