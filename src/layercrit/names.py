"""File names for ids: a value module (it imports nothing of ours), so that the measuring code and the writers of
results name files alike without importing each other."""

from __future__ import annotations

import hashlib


def file_name(text: str) -> str:
    """``text`` (a model id, a reset's description) as the name of one file or folder inside an output folder.

    Ids are data, never paths: ``/`` and ``\\``, control characters, ``%`` itself and a leading ``.`` (so ``.``,
    ``..`` and hidden names) are percent-escaped (``zoo:fmnist/baseline`` -> ``zoo:fmnist%2Fbaseline``,
    ``../x`` -> ``%2E.%2Fx``), which keeps every other name as it is and two ids apart. A name over 255 bytes is cut
    to 200 and ends with a hash of the whole id.
    """
    escaped = "".join(f"%{ord(c):02X}" if c in "%/\\" or ord(c) < 32 or ord(c) == 127 else c for c in text)
    if escaped.startswith(".") or not escaped:
        escaped = "%2E" + escaped[1:] if escaped else "%00"
    if len(escaped.encode()) > 255:
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        escaped = escaped.encode()[:200].decode(errors="ignore") + "~" + digest
    return escaped
