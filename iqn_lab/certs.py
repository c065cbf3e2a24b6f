"""Self-signed certificates made at ``up`` (OpenVPN peers and the OTT's TLS).

No CA and no static key: OpenVPN pins peers by certificate fingerprint, and
Chromium trusts the OTT by the hash of its public key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def make_cert(cert_path: Path, key_path: Path, common_name: str, dns_names: tuple[str, ...] = ()) -> None:
    """Write a P-256 self-signed certificate and its key (PEM), valid ten days.

    A short validity is fine (certificates are remade at every ``up``) and
    Chromium rejects leaf certificates valid for very long periods.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=10))
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def write_private(path: Path, data: bytes) -> None:
    """Write a secret into a new file that is 0600 from its first byte.

    Why not write then chmod: the key would sit readable (0644 under the usual
    umask) in between. Any file already at ``path`` is removed first and the new
    one made with O_EXCL and O_NOFOLLOW, so a planted symlink or a file someone
    else owns (and could read later) is never written through.
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load(cert_path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(cert_path.read_bytes())


def fingerprint(cert_path: Path) -> str:
    """SHA-256 fingerprint as OpenVPN's ``peer-fingerprint`` wants it (AB:CD:...)."""
    digest = _load(cert_path).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def spki_hash(cert_path: Path) -> str:
    """Base64 SHA-256 of the public key, for ``--ignore-certificate-errors-spki-list``."""
    spki = (
        _load(cert_path)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()
