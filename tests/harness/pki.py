"""A throw-away certificate authority for TLS registries and the token issuer.

``create_pki(dir)`` writes a CA and a server certificate for ``IP:127.0.0.1`` and
``DNS:localhost`` as PEM files; ``TestPKI.issue()`` signs more pairs with the same CA
(the token issuer's signing certificate, client certificates). Keys are ECDSA P-256 by
default because they are generated in microseconds; RSA is available where a test
needs RS256.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ec", "rsa"]
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_VALIDITY = datetime.timedelta(days=30)
# Backdate certificates so a clock a little behind ours still accepts them.
_BACKDATE = datetime.timedelta(days=1)


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, both PEM files (key unencrypted, PKCS#8)."""

    cert: Path
    key: Path

    def load_key(self) -> PrivateKey:
        """The private key object (for signing tokens)."""
        key = serialization.load_pem_private_key(self.key.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError(f"{self.key}: unsupported key type {type(key).__name__}")
        return key

    def load_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert.read_bytes())


@dataclass(frozen=True)
class TestPKI:
    """A test CA and a loopback server certificate it signed.

    ``ca_cert`` is what clients trust (``verify=``, ``--cacert``, skopeo's
    ``--cert-dir``); ``cert_dir`` holds only ``ca.crt``, the layout skopeo and
    containerd read. ``issue()`` is safe to call from several threads: each pair goes
    to its own files.
    """

    __test__ = False  # not a pytest test class despite the name

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    cert_dir: Path

    @property
    def ca(self) -> CertPair:
        return CertPair(self.ca_cert, self.ca_key)

    @property
    def server(self) -> CertPair:
        return CertPair(self.server_cert, self.server_key)

    def issue(
        self,
        name: str,
        *,
        ips: Sequence[str] = (),
        dns: Sequence[str] = (),
        key_type: KeyType = "ec",
        server: bool = False,
    ) -> CertPair:
        """Sign a new certificate ``CN=name`` with the CA, written as ``name.crt/.key``.

        ``ips``/``dns`` become subjectAltNames; ``server=True`` adds the serverAuth
        extended key usage. Overwrites earlier files of the same name.
        """
        ca_pair = self.ca
        ca_key = ca_pair.load_key()
        ca_cert = ca_pair.load_cert()
        key = _new_key(key_type)
        cert = _sign(
            subject=name,
            public_key=key,
            issuer_cert=ca_cert,
            issuer_key=ca_key,
            ips=ips,
            dns=dns,
            server=server,
        )
        return _write_pair(self.directory, name, cert, key)


def create_pki(directory: Path, *, server_key_type: KeyType = "ec") -> TestPKI:
    """Create a CA and a server certificate for 127.0.0.1/localhost under ``directory``.

    Files: ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key`` and ``certs/ca.crt``.
    The directory is created when missing.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key("ec")
    now = datetime.datetime.now(datetime.UTC)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bmsync test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    ca = _write_pair(directory, "ca", ca_cert, ca_key)
    server_key = _new_key(server_key_type)
    server_cert = _sign(
        subject="localhost",
        public_key=server_key,
        issuer_cert=ca_cert,
        issuer_key=ca_key,
        ips=["127.0.0.1"],
        dns=["localhost"],
        server=True,
    )
    server = _write_pair(directory, "server", server_cert, server_key)
    cert_dir = directory / "certs"
    cert_dir.mkdir(exist_ok=True)
    (cert_dir / "ca.crt").write_bytes(ca.cert.read_bytes())
    return TestPKI(
        directory=directory,
        ca_cert=ca.cert,
        ca_key=ca.key,
        server_cert=server.cert,
        server_key=server.key,
        cert_dir=cert_dir,
    )


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _sign(
    *,
    subject: str,
    public_key: PrivateKey,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    ips: Sequence[str],
    dns: Sequence[str],
    server: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    is_rsa = isinstance(public_key, rsa.RSAPrivateKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                # RSA key exchange in TLS needs keyEncipherment; ECDSA keys must not have it.
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if server:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pair(directory: Path, name: str, cert: x509.Certificate, key: PrivateKey) -> CertPair:
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return CertPair(cert_path, key_path)
