"""Keeping secrets out of logs, help texts and reprs."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters of a Redis URL that carry secrets.
_SECRET_PARAMS = frozenset({"password", "sentinel_password", "ssl_password"})


def redact_url(url: str | None) -> str | None:
    """``url`` with any password replaced by ``***`` (user and host kept)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    userinfo, at, hosts = netloc.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hosts}" if colon else f"{user}@{hosts}"
        if user and not colon:
            # redis://secret@host: a lone userinfo is taken as the password.
            netloc = f"{MASK}@{hosts}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*/"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))
