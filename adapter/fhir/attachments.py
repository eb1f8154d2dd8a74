"""Attachment → text: decode what a reranker can read, name what it cannot.

`Attachment.data` is base64 in the raw JSON (we walk the raw dict, so we decode it here; the
fhir.resources models would already have decoded it). Attachments given by `url` are fetched
through an optional `attachment_loader(url) -> (content_type, bytes) | None`, so this module
never does network I/O itself.

Decoded: text/plain (and csv/tsv), text/html and xhtml (tags stripped, script/style dropped),
text/markdown (light strip), XML such as CDA (tags stripped). Anything else is named:
"[attachment application/pdf, 12 kB, not decoded]". Decoded text is capped per attachment.
"""
from __future__ import annotations

import base64
import binascii
import html
import logging
import re
from html.parser import HTMLParser
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Most characters kept from one decoded attachment (longer text is cut, with a marker).
MAX_ATTACHMENT_CHARS = 200_000

AttachmentLoader = Callable[[str], "tuple[str, bytes] | None"]

_PLAIN_TYPES = {"text/plain", "text/csv", "text/tab-separated-values"}
_HTML_TYPES = {"text/html", "application/xhtml+xml"}
_MARKDOWN_TYPES = {"text/markdown", "text/x-markdown"}
_BLOCK_TAGS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "table",
               "ul", "ol", "section", "article", "pre", "blockquote", "hr", "title",
               "paragraph", "item"}
_DROP_TAGS = {"script", "style", "head"}


class _TextExtractor(HTMLParser):
    """Collects the visible text of HTML/XML; block elements become line breaks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._dropping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP_TAGS:
            self._dropping += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")
        elif tag == "td" or tag == "th":
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP_TAGS:
            self._dropping = max(0, self._dropping - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._dropping:
            self.parts.append(data)


_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")  # horizontal whitespace only: lines stay lines


def _tidy_lines(text: str) -> str:
    """Collapse runs of spaces within lines and drop blank lines."""
    lines = (line.strip() for line in _SPACES.sub(" ", text).split("\n"))
    return "\n".join(line for line in lines if line)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML (or XML) fragment: tags stripped, script/style dropped."""
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
    except Exception:  # noqa: BLE001 - malformed markup: fall back to a regex strip
        log.warning("markup could not be parsed; stripping tags with a regex")
        stripped = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", markup)
        return _tidy_lines(html.unescape(re.sub(r"<[^>]+>", " ", stripped)))
    return _tidy_lines("".join(parser.parts))


def markdown_to_text(markdown: str) -> str:
    """Light markdown strip: headings, emphasis, code fences, links and images → plain text."""
    text = re.sub(r"!\[([^\]]*)\]\([^)]*\)", r"\1", markdown)  # images → alt text
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links → label
    text = re.sub(r"(?m)^\s{0,3}(#{1,6}|>+|[-*+]|\d+[.)])\s+", "", text)  # headings, quotes, bullets
    text = re.sub(r"(?m)^\s*(```|~~~).*$", "", text)  # code fences
    text = re.sub(r"(\*\*|__|\*|`)", "", text)  # emphasis and inline code marks
    text = re.sub(r"(?m)^\s*([-*_]\s*){3,}$", "", text)  # horizontal rules
    return _tidy_lines(text)


def _media_type(content_type: str | None) -> tuple[str, str]:
    """("type/subtype", charset) from a Content-Type value; charset defaults to utf-8."""
    if not content_type or not isinstance(content_type, str):
        return "", "utf-8"
    parts = [p.strip() for p in content_type.split(";")]
    charset = "utf-8"
    for param in parts[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset" and value.strip():
            charset = value.strip().strip('"')
    return parts[0].lower(), charset


def _decode_bytes(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset, errors="replace")
    except LookupError:  # unknown charset name
        return raw.decode("utf-8", errors="replace")


def _looks_like_text(raw: bytes) -> bool:
    """True for bytes that decode as UTF-8 without NULs (used when no content type is given)."""
    if b"\x00" in raw[:4096]:
        return False
    try:
        raw[:65536].decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte char cut at the window edge is fine
        return exc.start >= min(len(raw), 65536) - 3
    return True


def bytes_to_text(raw: bytes, content_type: str | None) -> str | None:
    """Readable text of an attachment's bytes, or None when the content type is not readable."""
    media, charset = _media_type(content_type)
    if not media:
        media = "text/plain" if _looks_like_text(raw) else ""
    if media in _PLAIN_TYPES:
        text = _tidy_lines(_decode_bytes(raw, charset))
    elif media in _HTML_TYPES or media.endswith("/xml") or media.endswith("+xml"):
        text = html_to_text(_decode_bytes(raw, charset))
    elif media in _MARKDOWN_TYPES:
        text = markdown_to_text(_decode_bytes(raw, charset))
    else:
        return None
    if len(text) > MAX_ATTACHMENT_CHARS:
        text = text[:MAX_ATTACHMENT_CHARS] + " [… attachment text cut]"
    return text


def _size_label(size: int | None) -> str:
    if size is None:
        return "size unknown"
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{round(size / 1024)} kB"
    return f"{size / (1024 * 1024):.1f} MB"


def _declared_size(attachment: dict[str, Any]) -> int | None:
    size = attachment.get("size")
    if isinstance(size, bool):
        return None
    if isinstance(size, (int, str)) and str(size).isdigit():
        return int(size)
    return None


def attachment_to_text(attachment: Any, loader: AttachmentLoader | None = None) -> str:
    """One attachment → its decoded text, or a short "[attachment …]" note saying why not.

    Never raises: bad base64, a failing loader or odd field types give a note instead.
    """
    if not isinstance(attachment, dict):
        return ""
    content_type = attachment.get("contentType") if isinstance(attachment.get("contentType"), str) else None
    media = _media_type(content_type)[0] or "of unknown type"
    raw: bytes | None = None
    data = attachment.get("data")
    url = attachment.get("url")
    if isinstance(data, str) and data.strip():
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            log.warning("attachment data is not valid base64; skipped")
            return f"[attachment {media}, invalid base64, not decoded]"
    elif isinstance(data, (bytes, bytearray)):  # already decoded by a model layer
        raw = bytes(data)
    elif isinstance(url, str) and url.strip():
        if loader is None:
            return f"[attachment {media} at a url, not loaded]"
        try:
            loaded = loader(url)
        except Exception as exc:  # noqa: BLE001 - a loader failure must not fail the flatten
            log.warning("attachment loader failed (%s); attachment skipped", type(exc).__name__)
            return f"[attachment {media}, could not be loaded]"
        if loaded is None:
            return f"[attachment {media}, could not be loaded]"
        loaded_type, raw = loaded
        content_type = loaded_type or content_type
        media = _media_type(content_type)[0] or media
    else:
        return ""
    text = bytes_to_text(raw, content_type) if raw is not None else None
    if text is None:
        size = _declared_size(attachment)
        size = len(raw) if raw is not None and size is None else size
        return f"[attachment {media}, {_size_label(size)}, not decoded]"
    return text
