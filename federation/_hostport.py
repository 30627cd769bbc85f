"""``HOST:PORT`` as users write it: a DNS name, an IPv4 address or a bracketed IPv6
address, a colon, and a port from 1 to 65535.

Used where the CLI refuses bad input before sending anything (exports ``target``,
``--gateway-address``); wire readers stay lenient and check on their own.
"""

from __future__ import annotations

import ipaddress
import re

_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def split_host_port(text: str) -> tuple[str, int]:
    """``"10.0.0.5:8080"`` -> ``("10.0.0.5", 8080)``; ``ValueError`` saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} has no port: write HOST:PORT, e.g. {text or 'localhost'}:8080")
    if not port.isdigit():
        raise ValueError(f"{text!r}: the port {port!r} is not a number: write HOST:PORT")
    if not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: port {int(port)} is outside 1-65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
        return host[1:-1], int(port)
    if ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:{port}")
    if not _NAME.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, no port) is this machine's loopback only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
