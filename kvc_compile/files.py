"""File modes for what the project writes for others to use (engines, projections files)."""

from __future__ import annotations

import os


def default_mode(directory: bool = False) -> int:
    """The mode ``os.makedirs`` or ``open`` would give: 0777/0666 less the umask. ``mkdtemp``,
    ``mkstemp`` and safetensors create private files and folders; what is meant to be shared gets this."""
    umask = os.umask(0)  # the only way to read the umask is to set it; restored at once
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask
