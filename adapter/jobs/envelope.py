"""The sealed envelope: what crosses Redis (payloads and results), compressed and
Fernet-encrypted.

Encrypted by default: with Redis configured and `payload_key` empty, `ensure_payload_key`
keeps a key made on first start in `<state_dir>/payload.key` (created 0600 in a 0700 folder;
`state_dir` defaults to `$XDG_STATE_HOME/fhir-rerank`, else `~/.local/state/fhir-rerank`), and
every later start on that machine, API or worker, reads the same one. One log line says which
(made or read, and where; never the key). API and workers on other machines need the key as
`payload_key` (FHIR_RERANK_PAYLOAD_KEY); a worker holding another key fails the job with
that fix. A key file others may read, or a folder where none can be made, stops the start."""
from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter.errors import RerankerUnavailable

if TYPE_CHECKING:
    from adapter.config import Settings

log = logging.getLogger(__name__)
KEY_FILE = "payload.key"


class PayloadKeyError(RerankerUnavailable):
    """API and worker disagree on `payload_key`: a configuration fault, not worth a retry."""


def seal(data: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON that crosses Redis, zlib-compressed (flattened text and resources shrink
    10-17x) and Fernet-encrypted when a key is set."""
    raw = zlib.compress(json.dumps(data, separators=(",", ":")).encode("utf-8"))
    if not key:
        return {"zlib": base64.b64encode(raw).decode("ascii")}
    from cryptography.fernet import Fernet

    return {"fernet": Fernet(key.encode()).encrypt(raw).decode("ascii")}


def unseal(envelope: dict[str, Any], key: str) -> dict[str, Any]:
    """The JSON inside an envelope made by `seal`."""
    if "zlib" in envelope:
        return json.loads(zlib.decompress(base64.b64decode(envelope["zlib"])))
    if not key:
        raise PayloadKeyError("this process has no payload_key but the job is encrypted; "
                              "give API and workers the same FHIR_RERANK_PAYLOAD_KEY")
    from cryptography.fernet import Fernet, InvalidToken

    try:
        raw = Fernet(key.encode()).decrypt(envelope["fernet"].encode("ascii"))
    except InvalidToken:
        raise PayloadKeyError("the job was encrypted with another payload_key; give API "
                              "and workers the same FHIR_RERANK_PAYLOAD_KEY") from None
    return json.loads(zlib.decompress(raw))


def check_payload_key(key: str) -> None:
    """Fail at start-up, with the fix, when the configured key is not a Fernet key."""
    if not key:
        return
    from cryptography.fernet import Fernet

    try:
        Fernet(key.encode())
    except (ValueError, TypeError):
        raise ValueError("payload_key is not a Fernet key (32 url-safe base64 bytes); make one "
                         "with: python -c 'from cryptography.fernet import Fernet; "
                         "print(Fernet.generate_key().decode())'") from None


def state_dir(settings: "Settings") -> Path:
    """Where this machine keeps what must outlive a process (the payload key)."""
    if settings.state_dir:
        return Path(settings.state_dir).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "fhir-rerank"


def _fix(path: Path) -> str:
    return (f"set payload_key (FHIR_RERANK_PAYLOAD_KEY) to a Fernet key, or state_dir "
            f"(FHIR_RERANK_STATE_DIR) to a folder only this service's user may read "
            f"(now {path.parent})")


def _read_key(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & 0o077:
        raise ValueError(f"the payload key file {path} may be read by other users (mode "
                         f"{mode & 0o777:o}); chmod 600 it, or {_fix(path)}")
    key = path.read_text(encoding="ascii").strip()
    try:
        check_payload_key(key)
    except ValueError:
        raise ValueError(f"{path} holds no Fernet key; delete it to make a new one (jobs "
                         f"sealed with it are then unreadable), or {_fix(path)}") from None
    return key


def ensure_payload_key(settings: "Settings") -> str:
    """The Fernet key jobs are sealed with, its one log line said now (`resolve_payload_key`)."""
    key, note = resolve_payload_key(settings)
    log.info("%s", note)
    return key


def resolve_payload_key(settings: "Settings") -> tuple[str, str]:
    """(key, the one log line that says which) for sealing jobs: `payload_key` when set, else
    the one kept in `<state_dir>/payload.key`, made now if there is none (see the module
    docstring). Raises ValueError, with the fix, when no key can be had."""
    if settings.payload_key:
        check_payload_key(settings.payload_key)
        return settings.payload_key, "job payloads and results in Redis are encrypted with " \
                                     "payload_key"
    path = state_dir(settings) / KEY_FILE
    try:
        if not path.exists():
            from cryptography.fernet import Fernet

            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(dir=path.parent, prefix=".payload-key-")  # 0600
            try:
                with os.fdopen(fd, "w", encoding="ascii") as out:
                    out.write(Fernet.generate_key().decode("ascii") + "\n")
                    out.flush()
                    os.fsync(out.fileno())
                os.link(temp, path)  # atomic: two processes starting at once keep one key
                made = True
            except FileExistsError:
                made = False
            finally:
                os.unlink(temp)
        else:
            made = False
        key = _read_key(path)
    except OSError as exc:
        raise ValueError(f"payload_key is empty and no key could be kept in {path} "
                         f"({type(exc).__name__}); {_fix(path)}") from None
    return key, (f"payload_key is empty: job payloads and results in Redis are encrypted "
                 f"with the key {'made now and kept in' if made else 'kept in'} {path} (API "
                 "and workers on other machines need it as FHIR_RERANK_PAYLOAD_KEY)")
