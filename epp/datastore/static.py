"""A static pool from `--endpoints`: `host:port[;label=value...]` entries separated by commas."""

from __future__ import annotations

import ipaddress

from epp.datastore.endpoint import Endpoint


def parse_endpoints(spec: str) -> list[Endpoint]:
    """`10.0.0.1:8000,10.0.0.2:8000;role=decode;inference.networking.k8s.io/engine-type=vllm`.

    Each endpoint is named `ip:port`. Raises ValueError with the offending entry and the expected form."""
    out: list[Endpoint] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        hostport, *label_parts = entry.split(";")
        host, port = _split_hostport(hostport.strip(), entry)
        labels: dict[str, str] = {}
        for part in label_parts:
            if not part.strip():
                continue
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--endpoints entry {entry!r}: label {part!r} must be key=value")
            labels[key.strip()] = value.strip()
        ep = Endpoint(name="", address=host, port=port, labels=labels)
        ep.name = ep.hostport
        if ep.name in seen:
            raise ValueError(f"--endpoints lists {ep.name} twice")
        seen.add(ep.name)
        out.append(ep)
    if not out:
        raise ValueError("--endpoints is empty: give host:port entries separated by commas, e.g. "
                         "10.0.0.1:8000,10.0.0.2:8000")
    return out


def _split_hostport(hostport: str, entry: str) -> tuple[str, int]:
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = hostport.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"--endpoints entry {entry!r} must be host:port (port 1-65535), e.g. 10.0.0.1:8000")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(c.isalnum() or c in "-." for c in host):
            raise ValueError(f"--endpoints entry {entry!r}: {host!r} is not an IP address or host name") from None
    return host, int(port_text)
