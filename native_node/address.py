"""What `--coordinator` accepts: `host:port`, a bare host (port 8470), `http(s)://host:port/`,
the page's URL as the browser shows it (any path or query), or `ws(s)://host:port/ws`.
https/wss mean TLS, http/ws plain; a bare `host[:port]` means TLS when the server offers it
(native_node.client tries wss first; `coordinator_tls`).

    >>> coordinator_url("127.0.0.1:8470")
    ('ws://127.0.0.1:8470/ws', '127.0.0.1:8470')
    >>> coordinator_url("https://example.org/?contribute=0")
    ('wss://example.org:443/ws', 'example.org:443')
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORT = 8470  # python -m server's default
_SCHEMES = {"http": "ws", "ws": "ws", "https": "wss", "wss": "wss"}


class AddressError(ValueError):
    """`--coordinator` is not an address we can connect to."""


def coordinator_url(text: str) -> tuple[str, str]:
    """(the control socket's URL, `host:port` for messages) of a `--coordinator` value."""
    raw = text.strip()
    if not raw:
        raise AddressError("--coordinator is empty: give HOST:PORT, e.g. 127.0.0.1:8470")
    has_scheme = "://" in raw
    parts = urlsplit(raw if has_scheme else f"http://{raw}")
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise AddressError(f"--coordinator {text!r}: scheme {parts.scheme!r} is not one of "
                           f"http, https, ws, wss")
    try:
        port = parts.port
    except ValueError:
        raise AddressError(f"--coordinator {text!r}: the port is not a number in "
                           f"1..65535") from None
    host = parts.hostname
    if not host:
        raise AddressError(f"--coordinator {text!r}: no host name; give HOST:PORT, e.g. "
                           f"127.0.0.1:8470")
    if port is None:
        port = {"ws": 80, "wss": 443}[scheme] if has_scheme else DEFAULT_PORT
    if port == 0:
        raise AddressError(f"--coordinator {text!r}: port 0 cannot be connected to")
    shown = f"[{host}]" if ":" in host else host
    where = f"{shown}:{port}"
    return f"{scheme}://{where}/ws", where


def coordinator_tls(text: str) -> bool | None:
    """True for https:// and wss://, False for http:// and ws://, None for a bare HOST[:PORT]
    (the node then uses TLS when the server offers it).

    >>> coordinator_tls("https://example.org"), coordinator_tls("ws://h:1"), coordinator_tls("h")
    (True, False, None)
    """
    raw = text.strip()
    if "://" not in raw:
        return None
    return _SCHEMES.get(raw.split("://", 1)[0].lower()) == "wss"
