"""Certificates and keys for a deployed federation: a private CA, the SuperLink's TLS certificate and
one authentication key pair per SuperNode, made with the `cryptography` package.

TLS keeps shared-adapter updates unreadable on the wire; node keys let the SuperLink refuse any
SuperNode whose public key was not registered. Files are created once and never overwritten:
running `fedoppu certs create` again only adds what is missing (a new node's key) and never
invalidates a certificate or key that was already handed out.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.io import DataError, atomic_write_bytes

CA_DAYS = 3650
SERVER_DAYS = 825
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class CertError(DataError):
    """A certificate or key file is missing, unreadable or does not fit the request."""


@dataclass(frozen=True)
class CertDir:
    """The layout of a certificate directory; the server needs all of it, a node only `ca.crt`."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    def node_key(self, name: str) -> Path:
        return self.root / "nodes" / name

    def node_public_key(self, name: str) -> Path:
        return self.root / "nodes" / f"{name}.pub"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    atomic_write_bytes(path, data)  # created 0600 by mkstemp
    if not private:
        path.chmod(0o644)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as err:
        raise CertError(f"{path}: not an unencrypted PEM private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{path}: expected an EC private key in PEM format")
    return key


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        raise CertError(f"{path}: not a PEM certificate ({err})") from err


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def create_ca(certs: CertDir) -> None:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedoppu federation CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(certs.ca_key, _pem_key(key), private=True)
    _write(certs.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def create_server_cert(certs: CertDir, hosts: list[str]) -> None:
    """A certificate for the SuperLink, valid for every address nodes and `flwr` use to reach it."""
    ca_cert, ca_key = _load_cert(certs.ca_cert), _load_key(certs.ca_key)
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(certs.server_key, _pem_key(key), private=True)
    _write(certs.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def server_hosts(path: Path) -> list[str]:
    """The host names and addresses a server certificate is valid for."""
    names = _load_cert(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(value) for value in names.get_values_for_type(x509.DNSName)] + [
        str(value) for value in names.get_values_for_type(x509.IPAddress)
    ]


def create_node_key(certs: CertDir, name: str) -> None:
    """An ECDSA P-384 key pair in OpenSSH format, the form SuperNode authentication reads."""
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(certs.node_key(name), private, private=True)
    _write(certs.node_public_key(name), public + f" {name}\n".encode(), private=False)


def ensure_certs(root: str | Path, hosts: list[str], nodes: list[str]) -> list[Path]:
    """Create whatever is missing under `root`; returns the files written, existing ones are kept."""
    certs = CertDir(Path(root))
    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    for name in nodes:
        if not _NODE_NAME.fullmatch(name):
            raise CertError(f"node name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64)")
    written: list[Path] = []
    if not certs.ca_cert.exists() or not certs.ca_key.exists():
        if certs.server_cert.exists():
            raise CertError(
                f"{certs.server_cert} exists but its CA ({certs.ca_cert}, {certs.ca_key}) does not; "
                "remove the directory's certificates to start over"
            )
        create_ca(certs)
        written += [certs.ca_cert, certs.ca_key]
    if certs.server_cert.exists() and certs.server_key.exists():
        missing = sorted(set(hosts) - set(server_hosts(certs.server_cert)))
        if missing:
            raise CertError(
                f"{certs.server_cert} is not valid for {missing}; delete it and {certs.server_key.name} "
                "to issue a new one (nodes keep working: they trust the CA, not this certificate)"
            )
    else:
        create_server_cert(certs, hosts)
        written += [certs.server_cert, certs.server_key]
    for name in nodes:
        if not certs.node_key(name).exists():
            create_node_key(certs, name)
            written += [certs.node_key(name), certs.node_public_key(name)]
    return written
