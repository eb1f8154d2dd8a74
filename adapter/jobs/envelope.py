"""The sealed envelope: what crosses Redis (payloads and results), compressed and, with
`payload_key`, Fernet-encrypted."""
from __future__ import annotations

import base64
import json
import zlib
from typing import Any

from adapter.errors import RerankerUnavailable


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
