"""The trust domain's X.509 PKI: a CA, the control plane's server certificate,
short-lived node certificates and operator certificates, and the trust bundle.

The control plane is the trust domain's certificate authority, in the manner of
a SPIRE server. Identities are SPIFFE IDs in the certificate's single URI SAN:

* ``spiffe://DOMAIN/node/NODE_ID`` for a node; the subject's ``serialNumber``
  attribute holds the keyid of the node's Ed25519 receipt key, so a certificate
  stops being accepted as soon as an operator re-keys or revokes the node.
* ``spiffe://DOMAIN/operator/ROLE/NAME`` for an operator with a role.

TLS keys are ECDSA P-256 (what every TLS stack accepts); the node's Ed25519
key stays its signing identity and proves possession at enrolment. Pure crypto:
no gRPC, no I/O beyond the explicit load/save helpers.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tether.core.errors import ConfigError, VerificationError
from tether.crypto.signing import VerifyKey

DEFAULT_TRUST_DOMAIN = "tether.local"
DEFAULT_NODE_CERT_TTL_MS = 3600 * 1000
DEFAULT_OPERATOR_CERT_TTL_MS = 30 * 24 * 3600 * 1000
DEFAULT_SERVER_CERT_TTL_MS = 365 * 24 * 3600 * 1000
CA_TTL_MS = 10 * 365 * 24 * 3600 * 1000
# Certificates start a little in the past so a peer whose clock is behind by
# minutes still accepts them (the issue's "clock skewed by minutes").
BACKDATE = datetime.timedelta(minutes=5)

_DOMAIN_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,253}[a-z0-9])?")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


class Role(StrEnum):
    """What an operator may do; see `tether.control.authz` for the RPC table."""

    ADMIN = "admin"
    SUBMITTER = "submitter"
    AUDITOR = "auditor"


@dataclass(frozen=True)
class Identity:
    """Who a verified peer certificate names."""

    kind: str  # "node" or "operator"
    name: str  # node id or operator name
    role: Role | None = None  # operators only
    node_keyid: str = ""  # nodes only: keyid of the Ed25519 key the cert was issued for
    spiffe_id: str = ""
    not_after_unix_ms: int = 0  # the certificate's expiry (0: none known)


def check_trust_domain(domain: str) -> str:
    """A trust domain name (lower-case DNS-like label).

    Raises:
        ConfigError: not a valid trust domain.
    """
    if not _DOMAIN_RE.fullmatch(domain):
        raise ConfigError(f"trust domain {domain!r} must be lower-case letters, digits, '.' or '-'")
    return domain


def node_spiffe_id(domain: str, node_id: str) -> str:
    return f"spiffe://{domain}/node/{node_id}"


def operator_spiffe_id(domain: str, role: Role, name: str) -> str:
    return f"spiffe://{domain}/operator/{role.value}/{name}"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _at(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


def generate_tls_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key for TLS."""
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def spki_der(key: ec.EllipticCurvePublicKey) -> bytes:
    """The SubjectPublicKeyInfo DER of a TLS public key (what enrolment binds)."""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_spki(der: bytes) -> ec.EllipticCurvePublicKey:
    """A P-256 public key from SPKI DER.

    Raises:
        VerificationError: not a P-256 SubjectPublicKeyInfo.
    """
    try:
        key = serialization.load_der_public_key(der)
    except ValueError as err:
        raise VerificationError(f"TLS public key is not SPKI DER: {err}") from err
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise VerificationError("TLS public key must be ECDSA P-256")
    return key


@dataclass(frozen=True)
class CertificateAuthority:
    """The trust domain's CA: signs server, node and operator certificates."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    trust_domain: str

    @classmethod
    def create(cls, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> CertificateAuthority:
        """A new self-signed CA for `trust_domain`, valid ten years."""
        check_trust_domain(trust_domain)
        key = generate_tls_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Tether CA {trust_domain}"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + datetime.timedelta(milliseconds=CA_TTL_MS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key, trust_domain)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path, trust_domain: str) -> CertificateAuthority:
        """Loads a CA certificate and its private key (PEM).

        Raises:
            ConfigError: unreadable, not PEM, not a CA, or the key does not match.
        """
        cert = load_certificate(cert_path)
        try:
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except OSError as err:
            raise ConfigError(f"cannot read CA key {key_path}: {err.strerror}") from err
        except (ValueError, TypeError) as err:
            raise ConfigError(f"CA key {key_path} is not an unencrypted PEM key: {err}") from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"CA key {key_path} must be an ECDSA key")
        if spki_der(key.public_key()) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ConfigError(f"CA key {key_path} does not match certificate {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise ConfigError(f"{cert_path} is not a CA certificate (BasicConstraints CA=false)")
        return cls(cert, key, check_trust_domain(trust_domain))

    def _leaf(
        self,
        subject: x509.Name,
        public_key: ec.EllipticCurvePublicKey,
        san: Sequence[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(min(not_after, self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(list(san)), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def issue_server(
        self,
        public_key: ec.EllipticCurvePublicKey,
        sans: Iterable[str],
        ttl_ms: int = DEFAULT_SERVER_CERT_TTL_MS,
    ) -> x509.Certificate:
        """A TLS server certificate for host names and IP addresses `sans`."""
        names: list[x509.GeneralName] = []
        for s in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(s)))
            except ValueError:
                names.append(x509.DNSName(s))
        if not names:
            raise ConfigError("a server certificate needs at least one --san")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value))])
        now = _now()
        return self._leaf(
            subject,
            public_key,
            names,
            ExtendedKeyUsageOID.SERVER_AUTH,
            now - BACKDATE,
            now + datetime.timedelta(milliseconds=ttl_ms),
        )

    def issue_node(
        self,
        node_id: str,
        node_keyid: str,
        public_key: ec.EllipticCurvePublicKey,
        now_ms: int,
        ttl_ms: int = DEFAULT_NODE_CERT_TTL_MS,
    ) -> x509.Certificate:
        """A short-lived mTLS client certificate for a node (SPIFFE ID in the URI SAN)."""
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, node_id),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, node_keyid),
            ]
        )
        uri = x509.UniformResourceIdentifier(node_spiffe_id(self.trust_domain, node_id))
        now = _at(now_ms)
        return self._leaf(
            subject,
            public_key,
            [uri],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now - BACKDATE,
            now + datetime.timedelta(milliseconds=ttl_ms),
        )

    def issue_operator(
        self,
        name: str,
        role: Role,
        public_key: ec.EllipticCurvePublicKey,
        ttl_ms: int = DEFAULT_OPERATOR_CERT_TTL_MS,
    ) -> x509.Certificate:
        """An operator's mTLS client certificate carrying its role."""
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"operator name {name!r} must match [A-Za-z0-9._-]{{1,128}}")
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, name),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role.value),
            ]
        )
        uri = x509.UniformResourceIdentifier(operator_spiffe_id(self.trust_domain, role, name))
        now = _now()
        return self._leaf(
            subject,
            public_key,
            [uri],
            ExtendedKeyUsageOID.CLIENT_AUTH,
            now - BACKDATE,
            now + datetime.timedelta(milliseconds=ttl_ms),
        )


def trust_domain_of(ca: x509.Certificate) -> str:
    """The trust domain a CA certificate names (its spiffe://DOMAIN URI SAN).

    Raises:
        ConfigError: the CA names no trust domain (bring-your-own CAs: give it one).
    """
    try:
        san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier) if san else []:
        if uri.startswith("spiffe://") and "/" not in uri[len("spiffe://") :]:
            return check_trust_domain(uri[len("spiffe://") :])
    raise ConfigError("the CA certificate names no trust domain (a spiffe://DOMAIN URI SAN)")


def load_certificate(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file.

    Raises:
        ConfigError: unreadable or holding no certificate.
    """
    certs = load_certificates(path)
    return certs[0]


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file (other PEM blocks are skipped).

    Raises:
        ConfigError: unreadable or holding no certificate.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from err
    certs = parse_pem_certificates(data)
    if not certs:
        raise ConfigError(f"{path} holds no PEM certificate")
    return certs


_PEM_RE = re.compile(rb"-----BEGIN ([A-Z ]+)-----\r?\n.*?-----END \1-----\r?\n?", re.DOTALL)


def _pem_blocks(data: bytes, label: bytes) -> list[bytes]:
    return [m.group(0) for m in _PEM_RE.finditer(data) if m.group(1) == label]


def parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """The certificates in PEM `data` (other blocks skipped).

    Raises:
        ConfigError: a CERTIFICATE block that does not parse.
    """
    out = []
    for block in _pem_blocks(data, b"CERTIFICATE"):
        try:
            out.append(x509.load_pem_x509_certificate(block))
        except ValueError as err:
            raise ConfigError(f"malformed PEM certificate: {err}") from err
    return out


@dataclass(frozen=True)
class TrustBundle:
    """What a sidecar or client trusts: CA certificates (TLS) and control keys (leases).

    Several of each may be present at once, so the CA and the control plane's
    signing key can be rotated with an overlap window.
    """

    ca_certs: tuple[x509.Certificate, ...]
    control_keys: tuple[VerifyKey, ...]

    @property
    def ca_pem(self) -> bytes:
        return b"".join(cert_pem(c) for c in self.ca_certs)

    def control_keys_by_id(self) -> dict[str, VerifyKey]:
        return {k.keyid: k for k in self.control_keys}

    def to_pem(self) -> bytes:
        return self.ca_pem + b"".join(k.pem() for k in self.control_keys)

    @classmethod
    def parse(cls, data: bytes, source: str = "trust bundle") -> TrustBundle:
        """Parses a PEM trust bundle: CERTIFICATE blocks and Ed25519 PUBLIC KEY blocks.

        Raises:
            ConfigError: a malformed block.
        """
        certs = parse_pem_certificates(data)
        keys = []
        for block in _pem_blocks(data, b"PUBLIC KEY"):
            try:
                keys.append(VerifyKey.from_pem(block))
            except VerificationError as err:
                raise ConfigError(f"{source}: bad control public key: {err.message}") from err
        return cls(tuple(certs), tuple(keys))

    @classmethod
    def load(cls, path: Path, *, need_ca: bool = True, need_keys: bool = True) -> TrustBundle:
        """Loads a trust bundle file.

        Raises:
            ConfigError: unreadable, malformed, or missing the CA or the control key.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot read trust bundle {path}: {err.strerror}") from err
        bundle = cls.parse(data, str(path))
        if need_ca and not bundle.ca_certs:
            raise ConfigError(
                f"trust bundle {path} holds no CA certificate; use the trust.pem that "
                "`tether keys init` wrote"
            )
        if need_keys and not bundle.control_keys:
            raise ConfigError(
                f"trust bundle {path} holds no control-plane public key; use the trust.pem "
                "that `tether keys init` wrote"
            )
        return bundle

    def merge(self, other: TrustBundle) -> TrustBundle:
        certs = list(self.ca_certs)
        seen = {c.fingerprint(hashes.SHA256()) for c in certs}
        for c in other.ca_certs:
            if c.fingerprint(hashes.SHA256()) not in seen:
                certs.append(c)
        keys = dict(self.control_keys_by_id())
        keys.update(other.control_keys_by_id())
        return TrustBundle(tuple(certs), tuple(keys.values()))


def verify_issued_by(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> None:
    """Checks that one of `cas` signed `cert` (the TLS stack checks the chain again).

    Raises:
        VerificationError: no CA in `cas` signed it.
    """
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return
    raise VerificationError("certificate is not issued by a trusted CA")


@lru_cache(maxsize=4096)
def identity_from_pem(pem: bytes, trust_domain: str) -> Identity:
    """The identity a verified peer certificate names (cached: a pure function of the bytes).

    The TLS stack has already checked the chain and validity; this reads the
    SPIFFE ID and refuses one from another trust domain or of an unknown shape.

    Raises:
        VerificationError: not a Tether node or operator certificate of this domain.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound) as err:
        raise VerificationError(f"peer certificate has no usable URI SAN: {err}") from err
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise VerificationError("peer certificate must carry exactly one SPIFFE ID")
    uri = uris[0]
    not_after = int(cert.not_valid_after_utc.timestamp() * 1000)
    prefix = f"spiffe://{trust_domain}/"
    if not uri.startswith(prefix):
        raise VerificationError(f"peer certificate {uri!r} is not of trust domain {trust_domain}")
    parts = uri[len(prefix) :].split("/")
    if len(parts) == 2 and parts[0] == "node" and _NAME_RE.fullmatch(parts[1]):
        attrs = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
        keyid = str(attrs[0].value) if attrs else ""
        if not keyid:
            raise VerificationError("node certificate names no node key")
        return Identity(
            "node", parts[1], node_keyid=keyid, spiffe_id=uri, not_after_unix_ms=not_after
        )
    if len(parts) == 3 and parts[0] == "operator" and _NAME_RE.fullmatch(parts[2]):
        try:
            role = Role(parts[1])
        except ValueError:
            raise VerificationError(f"operator certificate has unknown role {parts[1]!r}") from None
        return Identity("operator", parts[2], role=role, spiffe_id=uri, not_after_unix_ms=not_after)
    raise VerificationError(f"peer certificate {uri!r} names neither a node nor an operator")


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret file with mode 0600 (created so, never world-readable).

    The temporary file has an unpredictable name and is created exclusively
    (mkstemp: O_EXCL, mode 0600), so nobody who can write the directory can
    plant it beforehand and read the secret.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
