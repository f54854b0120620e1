"""Who may talk to the node: the start-up exposure check, source addresses, TLS, UIDs.

Pure functions of the settings (and of what a peer sent); the SCP
(`dicom_node.receiving.scp`) applies them. See docs/RELIABILITY.md for what each guards against.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl

from dicom_node.settings import Settings

# PS3.5 9.1: digits and dots, at most 64 characters. Leading zeros in a component are not
# allowed by the standard but common in the wild; they are harmless, so reading tolerates them.
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ExposureError(RuntimeError):
    """The node would listen to the network with no restriction on who may call."""


def is_valid_uid(value: str) -> bool:
    """A UID as PS3.5 writes it (tolerating leading zeros): safe in any file name or query."""
    return len(value) <= MAX_UID_LENGTH and bool(_UID_RE.match(value))


def is_loopback(bind: str) -> bool:
    """Whether `bind` (an address or a host name) reaches only this machine."""
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(bind, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_exposure(settings: Settings) -> None:
    """Refuse to serve on a network address with no allow-list, unless told to accept anyone."""
    restricted = bool(settings.allowed_calling_aes or settings.allowed_addresses)
    if restricted or settings.accept_any_caller or is_loopback(settings.bind):
        return
    raise ExposureError(
        f"the node would listen on {settings.bind} and accept any caller: set "
        "CXR_ALLOWED_CALLING_AES (and/or CXR_ALLOWED_ADDRESSES), bind to 127.0.0.1, or set "
        "CXR_ACCEPT_ANY_CALLER=true to accept anyone deliberately"
    )


def networks(settings: Settings) -> list[Network]:
    return [ipaddress.ip_network(item, strict=False) for item in settings.allowed_addresses]


def address_allowed(address: str, allowed: list[Network]) -> bool:
    """Whether a peer address is in one of the allowed networks (any address when none)."""
    if not allowed:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in allowed)


def server_tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The SCP's TLS context (TLS 1.2 or later), or None when TLS is not configured."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.tls_require_client_cert else ssl.CERT_OPTIONAL
        )
    return context
