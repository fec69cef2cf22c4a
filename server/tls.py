"""TLS for `python -m server --tls-cert FILE --tls-key FILE` (https and wss on one port), and
the client address behind a reverse proxy (`--trust-proxy ADDR`: that proxy's
X-Forwarded-For names the client, for the per-address limits of server.ws)."""

from __future__ import annotations

import ipaddress
import ssl

from aiohttp import web


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A TLS server context (TLS 1.2+) with the certificate chain and key, or ValueError
    saying what is wrong with them."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ValueError(f"TLS: {exc.filename}: no such file") from None
    except ssl.SSLError as exc:
        raise ValueError(f"TLS: --tls-cert {cert} / --tls-key {key} cannot be used: "
                         f"{exc.reason or exc} (PEM certificate chain and its private key)"
                         ) from None
    return ctx


def parse_proxies(text: str | None) -> frozenset[str]:
    """`--trust-proxy 127.0.0.1,::1`: the addresses whose X-Forwarded-For is believed."""
    out: set[str] = set()
    for part in (text or "").split(","):
        if part.strip():
            try:
                out.add(str(ipaddress.ip_address(part.strip())))
            except ValueError:
                raise ValueError(f"--trust-proxy: {part.strip()!r} is not an IP address"
                                 ) from None
    return frozenset(out)


TRUSTED_PROXIES = web.AppKey("trusted_proxies", frozenset)


def client_address(request: web.Request) -> str:
    """The connecting address, or behind a trusted proxy the client it forwarded for (the
    last X-Forwarded-For entry: the one the proxy itself appended)."""
    remote = str(request.remote)
    trusted = request.app.get(TRUSTED_PROXIES) or frozenset()
    if remote in trusted:
        forwarded = request.headers.get("X-Forwarded-For", "")
        last = forwarded.split(",")[-1].strip()
        if last:
            return last
    return remote
