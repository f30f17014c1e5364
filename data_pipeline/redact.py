"""Credentials out of locations and messages: what the data pipeline and the trainer write or print.

A URL's password (`user:password@`), a bare token in its user part, secret query parameters
(`token=`, `sig=`, `X-Amz-Signature=`, `key=`, ...) and `Bearer` tokens become `***`.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit

MASK = "***"
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
BEARER = re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}")
# A query parameter whose name holds one of these carries a secret (AWS, GCS, Azure SAS, generic).
SECRET_PARAMS = ("token", "sig", "key", "secret", "pass", "pwd", "credential", "auth", "session")

def redact_url(url: str) -> str:
    """`url` without its password, bare-token user part or secret query parameters."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0] + ":" + MASK if ":" in userinfo else MASK
        netloc = f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_secret(name) for name, _ in pairs):
            query = "&".join(f"{quote(n, safe='')}={MASK if _secret(n) else quote(v, safe='/:')}" for n, v in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))


def _secret(name: str) -> bool:
    return any(word in name.lower() for word in SECRET_PARAMS)


def redact_text(text: str) -> str:
    """Every URL inside `text` (a pipe: command, a message) redacted, and Bearer/Basic tokens masked."""
    return BEARER.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", URL.sub(lambda m: redact_url(m.group(0)), text))
