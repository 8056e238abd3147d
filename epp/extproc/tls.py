"""TLS for the ext_proc port: certificates from --cert-path, or a self-signed one made at start-up (as the
reference EPP does; gateways connect with verification off)."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import grpc


def self_signed(hostname: str = "epp") -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname), x509.DNSName("localhost")]), False)
        .sign(key, hashes.SHA256())
    )
    return (
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM),
    )


def cert_files(cert_path: str) -> tuple[Path, Path]:
    """(tls.crt, tls.key) under `cert_path`; exits with a message naming what is missing."""
    d = Path(cert_path)
    crt, key = d / "tls.crt", d / "tls.key"
    missing = [str(f) for f in (crt, key) if not f.is_file()]
    if missing:
        raise SystemExit(f"--cert-path {cert_path}: missing {', '.join(missing)} (expected tls.crt and tls.key)")
    return crt, key


def server_credentials(cert_path: str | None) -> grpc.ServerCredentials:
    if cert_path:
        crt, key = cert_files(cert_path)
        return grpc.ssl_server_credentials([(key.read_bytes(), crt.read_bytes())])
    key_pem, cert_pem = self_signed(os.environ.get("POD_NAME", "epp"))
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])
