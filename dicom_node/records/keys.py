"""The node's own keys: random bytes made once on the node host, never exported, and the
keyed hashes (HMAC-SHA256) made with them.

A keyed hash stands in for an identifier the node must recognise again but must not keep in
clear: the patient (hospital index, `secret.key`), the accession number of a study (ledger,
`CXR_DATA_DIR/keys/accession.key`: `cxr-node label --csv` finds studies by it), the patient
group of an exported dataset (`keys/export.key`, unless `CXR_EXPORT_SALT` is set). One key
per purpose, so a hash of one kind cannot be matched against another; without the key the
hashes mean nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from worker.atomic import fsync_folder

KEY_BYTES = 32


def load_or_create_key(path: Path) -> bytes:
    """The key at `path`: made once (32 random bytes, mode 0600), then only read.

    Written to a private temporary file and hard-linked into place, so a process starting
    at the same moment either sees the whole key or makes none of its own."""
    path = Path(path)
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
        fsync_folder(path.parent)
    key = path.read_bytes()
    if len(key) < KEY_BYTES:
        raise ValueError(f"{path} is damaged: the key is too short")
    return key


def keyed_hash(key: bytes, *parts: str) -> str:
    """HMAC-SHA256 of the parts (stripped, joined by a unit separator), as hex."""
    message = "\x1f".join(p.strip() for p in parts).encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


#: The key of the accession-number hashes in the ledger, in `Settings.keys_dir`.
ACCESSION_KEY_FILE = "accession.key"
#: The key of the patient groups of exported datasets (unless `CXR_EXPORT_SALT` is set).
EXPORT_KEY_FILE = "export.key"


def accession_hash(key: bytes, accession_number: str | None) -> str | None:
    """How the ledger knows a study's Accession Number; None when it has none."""
    text = (accession_number or "").strip()
    return keyed_hash(key, "accession", text) if text else None
