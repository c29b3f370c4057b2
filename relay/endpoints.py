"""The broker's endpoints: ``RELAY_AMQP_URL`` (one URL or several, comma-separated) parsed once, for
every client of the relay: the publishing client (relay.amqp) and the aio-pika users (relay.broker).

The URL forms are aio-pika's (aiormq parses them): ``amqps://`` with ``cafile``, ``capath``,
``cadata``, ``certfile``, ``keyfile``, ``no_verify_ssl`` and ``auth=external`` as query options.
This module only adds what a list needs and checks what aiormq would silently ignore: a TLS option on
an ``amqp://`` URL, a misspelt option, ``no_verify_ssl=false`` (aiormq reads any value but ``0`` as
*do not verify*), EXTERNAL login without a client certificate.
"""

from __future__ import annotations

import asyncio
import binascii
import ssl
from base64 import b64decode
from dataclasses import dataclass, field

from aiormq import SSLContextProvider
from aiormq.abc import SSLCerts
from yarl import URL

DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
DEFAULT_HEARTBEAT = 5  # seconds; hung-broker detection takes two heartbeats, so keep it near the publish timeout
TLS_OPTIONS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")
# Every query option aio-pika or aiormq reads from the URL. Anything else is a typo: a misspelt
# `cafile` would silently fall back to the system's CA store, so it is refused instead.
KNOWN_OPTIONS = frozenset(
    {
        *TLS_OPTIONS,
        "auth",
        "heartbeat",
        "timeout",
        "name",
        "reconnect_interval",
        "fail_fast",
        "interleave",
        "happy_eyeballs_delay",
    }
)
AUTH_MECHANISMS = ("plain", "external")


# OpenSSL's X509_V_ERR_* codes whose message alone does not say what to check.
_UNTRUSTED = " (is cafile the CA that signed the broker's certificate?)"
_VERIFY_HINTS = {
    18: _UNTRUSTED,  # self-signed certificate
    19: _UNTRUSTED,  # self-signed certificate in certificate chain
    20: _UNTRUSTED,  # unable to get local issuer certificate
    21: _UNTRUSTED,  # unable to verify the first certificate
    62: " (the URL's host must be a name in the broker's certificate)",  # host name mismatch
    64: " (the URL's host must be an address in the broker's certificate)",  # IP address mismatch
}


class EndpointError(ValueError):
    """``RELAY_AMQP_URL`` does not describe usable endpoints; the message never contains a password."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One broker node: where it is, how to speak TLS to it, how to log in."""

    url: str = field(repr=False)  # as configured, credentials included: never log it
    host: str
    port: int
    tls: bool
    vhost: str
    user: str
    password: str = field(repr=False)
    auth: str  # "plain" or "external" (the client certificate is the identity)
    heartbeat: int
    cafile: str | None = None
    capath: str | None = None
    cadata: bytes | None = field(default=None, repr=False)
    certfile: str | None = None
    keyfile: str | None = None
    verify: bool = True  # certificate chain *and* host name; off only with no_verify_ssl=1

    @property
    def display(self) -> str:
        """``host:port`` for logs, metrics and /readyz: never credentials, never options."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def redacted(self) -> str:
        """The URL with the password masked."""
        url = URL(self.url)
        return str(url.with_password("***")) if url.password is not None else self.url

    def ssl_certs(self) -> SSLCerts:
        return SSLCerts(
            cert=self.certfile,
            key=self.keyfile,
            capath=self.capath,
            cafile=self.cafile,
            cadata=self.cadata,
            verify=self.verify,
        )

    async def ssl_context(self) -> ssl.SSLContext | None:
        """A fresh TLS context for one connection (None for ``amqp://``), built by aiormq exactly as
        aio-pika builds it. Fresh each time, so renewed certificate files (cert-manager) are picked up
        at the next reconnect without a restart."""
        if not self.tls:
            return None
        provider = SSLContextProvider(ssl_context=None, ssl_certs=self.ssl_certs(), loop=asyncio.get_running_loop())
        return await provider.get_context()


def parse_endpoints(raw: str) -> tuple[Endpoint, ...]:
    """Parse a comma-separated list of AMQP URLs; raise :class:`EndpointError` naming each problem.

    Several URLs name the nodes of one cluster: only their host and port may differ, because a
    robust aio-pika connection reconnects with the first URL's credentials, vhost and options.
    A comma inside a password must be percent-encoded (``%2C``).
    """
    parts = [part.strip() for part in raw.split(",")]
    if not any(parts):
        raise EndpointError("no URL given")
    if not all(parts):
        raise EndpointError("an empty URL in the comma-separated list")
    endpoints = tuple(parse_endpoint(part) for part in parts)
    first = endpoints[0]
    for number, other in enumerate(endpoints[1:], start=2):
        if _shared(other) != _shared(first):
            raise EndpointError(
                f"URL {number} ({other.display}) differs from the first in more than host and port; every URL of"
                " the list must have the same scheme, user, password, vhost and options"
            )
    displays = [e.display for e in endpoints]
    if len(set(displays)) != len(displays):
        raise EndpointError(f"an endpoint is listed twice: {', '.join(displays)}")
    return endpoints


def _shared(endpoint: Endpoint) -> tuple[object, ...]:
    """What every endpoint of a list must have in common: all but host and port."""
    query = sorted(URL(endpoint.url).query.items())
    return (endpoint.tls, endpoint.user, endpoint.password, endpoint.vhost, query)


def parse_endpoint(raw: str) -> Endpoint:
    """Parse one AMQP URL the way aiormq does, refusing what aiormq would silently ignore."""
    try:
        url = URL(raw)
        scheme, host, port = url.scheme, url.host, url.port
    except ValueError as exc:
        # The library's message may quote the URL, and with it the password: say what is wrong instead.
        if "port" in str(exc).lower():
            raise EndpointError("the port must be a number from 1 to 65535") from None
        raise EndpointError(f"not a valid URL ({type(exc).__name__})") from None
    if scheme not in DEFAULT_PORTS:
        raise EndpointError(f"{_shown(url)}: must start with amqp:// or amqps://")
    if not host:
        raise EndpointError(f"{_shown(url)}: no host")
    port = port or DEFAULT_PORTS[scheme]
    where = f"{host}:{port}"
    query = url.query
    unknown = sorted(set(query) - KNOWN_OPTIONS)
    if unknown:
        raise EndpointError(f"{where}: unknown option {', '.join(unknown)} (known: {', '.join(sorted(KNOWN_OPTIONS))})")
    repeated = sorted({key for key in query if len(query.getall(key)) > 1})
    if repeated:
        raise EndpointError(f"{where}: option {', '.join(repeated)} given twice")
    tls = scheme == "amqps"
    given_tls = [name for name in TLS_OPTIONS if name in query]
    if given_tls and not tls:
        raise EndpointError(f"{where}: TLS options ({', '.join(given_tls)}) need an amqps:// URL")
    no_verify = query.get("no_verify_ssl", "0")
    if no_verify not in ("0", "1"):
        raise EndpointError(f"{where}: no_verify_ssl must be 0 or 1, got {no_verify!r}")
    if "keyfile" in query and "certfile" not in query:
        raise EndpointError(f"{where}: keyfile without certfile")
    auth = query.get("auth", "plain").lower()
    if auth not in AUTH_MECHANISMS:
        raise EndpointError(f"{where}: auth must be plain or external, got {auth!r}")
    if auth == "external" and "certfile" not in query:
        raise EndpointError(f"{where}: auth=external logs in with the client certificate: give certfile (amqps://)")
    cadata: bytes | None = None
    if "cadata" in query:
        try:
            cadata = b64decode(query["cadata"], validate=True)
        except binascii.Error:
            raise EndpointError(f"{where}: cadata must be base64") from None
    heartbeat = query.get("heartbeat", str(DEFAULT_HEARTBEAT))
    if not heartbeat.isdigit():
        raise EndpointError(f"{where}: heartbeat must be whole seconds, got {heartbeat!r}")
    # aiormq's reading of the path: "/" or nothing is the default vhost; %2F stands for "/".
    vhost = "/" if url.path in ("", "/") else url.path[1:].replace("%2F", "/")
    return Endpoint(
        url=raw,
        host=host,
        port=port,
        tls=tls,
        vhost=vhost,
        user=url.user or "guest",
        password=url.password or "guest",
        auth=auth,
        heartbeat=int(heartbeat),
        cafile=query.get("cafile"),
        capath=query.get("capath"),
        cadata=cadata,
        certfile=query.get("certfile"),
        keyfile=query.get("keyfile"),
        verify=no_verify == "0",
    )


def describe(exc: BaseException, endpoint: Endpoint | None = None) -> str:
    """Why a connection attempt failed, in words that name the cause (TLS verification, a certificate
    the broker refused, refused connection) and never contain a password. Looks through chained
    causes: both clients wrap transport errors in their own. Give the *endpoint* of a failed connect."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in chain:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for error in chain:
        if isinstance(error, ssl.SSLCertVerificationError):
            hint = _VERIFY_HINTS.get(error.verify_code, "")
            return f"TLS: the broker's certificate failed verification: {error.verify_message}{hint}"
        if isinstance(error, ssl.SSLError):
            reason = str(error.reason or error.strerror or error)
            if "_ALERT_" in reason:  # the broker ended the handshake, e.g. SSLV3_ALERT_CERTIFICATE_EXPIRED
                alert = reason.partition("_ALERT_")[2].replace("_", " ").lower()
                refused = " (it refused the client certificate)" if "CERTIFICATE" in reason or "_CA" in reason else ""
                return f"TLS: the broker sent alert '{alert}'{refused} [{reason}]"
            return f"TLS: {reason}"
    if any(isinstance(error, ConnectionRefusedError) for error in chain):
        return "connection refused"
    if any(isinstance(error, ConnectionResetError) for error in chain):
        if endpoint is not None and endpoint.certfile:
            # TLS 1.3: the client finishes its handshake first and sends the AMQP header; a broker
            # that refuses the certificate sends an alert and closes, and the header it never read
            # turns the close into a reset that can overtake the alert (seen in ~5% of attempts).
            return (
                "connection reset by the broker before the AMQP handshake; with a client certificate this is"
                " how a refused certificate shows when its TLS alert is lost: check certfile (expired? issued"
                " by the CA the broker trusts?)"
            )
        return "connection reset by the broker"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"[:300]


def redact(raw: str) -> str:
    """*raw* (one URL or a list) with every password replaced by ``***``, for errors and reprs."""
    return ",".join(_shown(part.strip()) if part.strip() else part for part in raw.split(","))


def _shown(url: URL | str) -> str:
    try:
        url = URL(url)
        return str(url.with_password("***")) if url.password is not None else str(url)
    except ValueError:
        return "<unparseable URL>"
