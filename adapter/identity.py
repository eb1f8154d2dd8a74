"""Who is calling: a stable, non-reversible identity derived from the Authorization header.

Jobs are readable only by the identity that created them, and text built from attachments
fetched with a caller's credentials is cached under that identity only. The header itself
is never stored.
"""
from __future__ import annotations

import hashlib

ANONYMOUS = "anonymous"


def caller_identity(authorization: str | None) -> str:
    if not authorization:
        return ANONYMOUS
    return "sha256:" + hashlib.sha256(authorization.encode("utf-8")).hexdigest()
