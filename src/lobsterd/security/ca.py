"""lobsterd's host certificate authority: TLS from Caddy into each guest, both ways.

Why a private CA: the hop Caddy → guest crosses the tenant's TAP link, so it is
encrypted and mutually authenticated. Each guest gets a short-lived server certificate
for ``<tenant>.guest.lobsterd.internal`` plus its IP; Caddy pins the name per route, so
a guest holding its own key cannot pose as another tenant. Caddy authenticates to the
guests with one client certificate.

Why no separate "guest-client CA": trust in this CA is never installed anywhere but in
Caddy's per-route transport and in the guests' TLS fronts, and its key never leaves the
host. Every certificate it signs carries exactly one extended key usage: guests get
``serverAuth`` only, Caddy gets ``clientAuth`` with the fixed subject CN
``lobsterd-caddy``. A guest's TLS front accepts a client only with ``clientAuth`` *and*
that CN, so a (compromised) guest's own server certificate is useless as a client
credential against another guest. A second CA would add a second key to protect and
rotate without closing any further gap.

The CA is constrained (RFC 5280 name constraints, critical) to ``lobsterd.internal``
and private/CGNAT IP ranges, so even a leaked CA key cannot mint a certificate a
standards-following client would accept for a public name; ``pathlen 0`` forbids
intermediates.

Files in ``ca_dir`` (``<config_dir>/ca``)::

    ca.key                  CA private key, 0600 root
    ca.pem                  CA certificate, 0644
    caddy-client-<id>.pem   Caddy's client certificate, 0644
    caddy-client-<id>.key   its key, 0640 root:caddy (0600 when there is no caddy group)

Guest server keys are generated fresh per issue and returned, never written here.
Caddy's client files are versioned by serial: a rotation changes the path, so routes
rendered with the new path differ from the live ones and the route reconcile reloads
them; the previous generations stay on disk because routes still in Caddy name them
until that reconcile happens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import grp
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lobsterd.core.names import is_valid_name
from lobsterd.errors import CaError, ValidationFailed

GUEST_DOMAIN = "guest.lobsterd.internal"
"""Parent of every guest server name; never resolvable in public DNS."""

PERMITTED_DNS = "lobsterd.internal"
PERMITTED_IP_RANGES: tuple[str, ...] = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
)
CLIENT_CN = "lobsterd-caddy"
"""Subject CN of Caddy's client certificate; the guest TLS front requires exactly this."""
CLIENT_SAN = "caddy.lobsterd.internal"
"""DNS SAN of Caddy's client certificate (RFC 5280 path validators expect a SAN)."""

CA_VALIDITY_DAYS = 3650
CLIENT_VALIDITY_DAYS = 90
CLIENT_ROTATE_MARGIN_DAYS = 30
MAX_SERVER_DAYS = 397
KEEP_CLIENT_GENERATIONS = 3
BACKDATE = dt.timedelta(hours=1)
"""Leaves start an hour in the past: a resumed guest's clock may lag until it is reset."""

_CA_KEY = "ca.key"
_CA_CERT = "ca.pem"
_CLIENT_PREFIX = "caddy-client-"


def guest_server_name(tenant: str) -> str:
    """SAN of ``tenant``'s guest server certificate (Caddy's ``server_name``)."""
    return f"{tenant}.{GUEST_DOMAIN}"


@dataclass(frozen=True)
class IssuedCert:
    """A freshly issued guest server certificate and its key (PEM text)."""

    server_name: str
    guest_ip: str
    cert_pem: str
    key_pem: str = field(repr=False)
    not_after: dt.datetime
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes, mode: int, gid: int | None = None) -> None:
    """Write via a private temp file + rename: a crash never leaves a half-written PEM,
    and the final mode/owner are set before any byte of a key is written."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if gid is not None:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _same_public_key(key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return key.public_key().public_bytes(enc, fmt) == cert.public_key().public_bytes(enc, fmt)


def _load_ec_key(data: bytes, path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(f"{path} is not a readable PEM private key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CaError(f"{path} is not an EC private key; remove the CA files to recreate it")
    return key


class HostCA:
    """The host CA in ``ca_dir``; every method is idempotent and safe across processes."""

    def __init__(self, ca_dir: Path, *, caddy_group: str | None = "caddy") -> None:
        self.ca_dir = Path(ca_dir)
        self.caddy_group = caddy_group

    # -- paths -------------------------------------------------------------------------

    @property
    def ca_file(self) -> Path:
        """The CA certificate (PEM), which Caddy uses as ``root_ca_pem_files``."""
        return self.ca_dir / _CA_CERT

    @property
    def key_file(self) -> Path:
        return self.ca_dir / _CA_KEY

    def _caddy_gid(self) -> int | None:
        """The caddy group's gid when files can be shared with it (root only)."""
        if self.caddy_group is None or os.geteuid() != 0:
            return None
        try:
            return grp.getgrnam(self.caddy_group).gr_gid
        except KeyError:
            return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise CA changes across processes (two inits must not mint two CAs)."""
        gid = self._caddy_gid()
        self.ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The directory is traversable by Caddy's group only; the CA key inside stays 0600.
        if gid is not None:
            os.chown(self.ca_dir, 0, gid)
            os.chmod(self.ca_dir, 0o750)  # noqa: S103 - group is caddy, others get nothing
        else:
            os.chmod(self.ca_dir, 0o700)
        fd = os.open(self.ca_dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- the CA itself -----------------------------------------------------------------

    def ensure(self) -> bool:
        """Create the CA unless a valid one exists; True when it was created now."""
        with self._locked():
            return self._ensure_locked()

    def _ensure_locked(self) -> bool:
        cert_ok = self.ca_file.exists()
        key_ok = self.key_file.exists()
        if cert_ok and key_ok:
            self._load()
            return False
        if cert_ok and not key_ok:
            raise CaError(
                f"host CA key {self.key_file} is missing but its certificate exists",
                hint=f"restore the key, or remove {self.ca_file} to create a new CA "
                "(then re-issue every guest certificate: lobsterd init, then molt)",
            )
        # Key without certificate: a crash between the two renames; nothing was ever
        # signed with that key (signing needs the certificate), so start over.
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._build_ca_cert(key)
        _write_atomic(self.key_file, _key_pem(key), 0o600)
        _write_atomic(self.ca_file, _cert_pem(cert), 0o644)
        return True

    @staticmethod
    def _build_ca_cert(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        now = _now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lobsterd"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"lobsterd host CA {now:%Y%m%d%H%M%S}"),
            ]
        )
        permitted: list[x509.GeneralName] = [x509.DNSName(PERMITTED_DNS)]
        permitted += [x509.IPAddress(ipaddress.ip_network(r)) for r in PERMITTED_IP_RANGES]
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=CA_VALIDITY_DAYS))
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
            .add_extension(
                x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )

    def _load(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        try:
            key_data = self.key_file.read_bytes()
            cert_data = self.ca_file.read_bytes()
        except FileNotFoundError:
            raise CaError(
                f"no host CA in {self.ca_dir}", hint="run lobsterd init to create it"
            ) from None
        except OSError as exc:
            raise CaError(f"cannot read the host CA in {self.ca_dir}: {exc.strerror}") from None
        key = _load_ec_key(key_data, self.key_file)
        try:
            cert = x509.load_pem_x509_certificate(cert_data)
        except ValueError as exc:
            raise CaError(f"{self.ca_file} is not a PEM certificate: {exc}") from None
        if not _same_public_key(key, cert):
            raise CaError(
                f"host CA key {self.key_file} does not match {self.ca_file}",
                hint="restore the matching pair from backup, or remove both to create a new CA",
            )
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CaError(f"{self.ca_file} is not a CA certificate")
        return key, cert

    def ca_pem(self) -> str:
        """The CA certificate as PEM text (what guests get as ``TLS_CLIENT_CA``)."""
        self.ensure()
        return self.ca_file.read_text(encoding="ascii")

    def ca_certificate(self) -> x509.Certificate:
        self.ensure()
        return x509.load_pem_x509_certificate(self.ca_file.read_bytes())

    # -- issuing -----------------------------------------------------------------------

    def _leaf_builder(
        self,
        ca_cert: x509.Certificate,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        days: int,
        eku: x509.ObjectIdentifier,
        now: dt.datetime,
    ) -> x509.CertificateBuilder:
        not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
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
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )

    def issue_server(self, tenant: str, guest_ip: str, days: int = 30) -> IssuedCert:
        """A new key and server certificate for ``tenant``'s guest TLS front.

        ``tenant`` is the tenant name (its guest server name is accepted too). The SANs
        are the guest server name and ``guest_ip``; the EKU is ``serverAuth`` only.
        """
        label = tenant
        suffix = "." + GUEST_DOMAIN
        if label.endswith(suffix):
            label = label[: -len(suffix)]
        if not is_valid_name(label):
            raise ValidationFailed(f"cannot issue a guest certificate: invalid tenant {tenant!r}")
        try:
            ip = ipaddress.ip_address(guest_ip)
        except ValueError:
            raise ValidationFailed(
                f"cannot issue a guest certificate: {guest_ip!r} is not an IP address"
            ) from None
        if not any(ip in ipaddress.ip_network(r) for r in PERMITTED_IP_RANGES):
            raise ValidationFailed(
                f"cannot issue a guest certificate for {ip}: the host CA is constrained to "
                + ", ".join(PERMITTED_IP_RANGES),
                hint="use a private address pool ([network] pool)",
            )
        if not 1 <= days <= MAX_SERVER_DAYS:
            raise ValidationFailed(f"certificate lifetime must be 1..{MAX_SERVER_DAYS} days")
        server_name = guest_server_name(label)
        with self._locked():
            self._ensure_locked()
            ca_key, ca_cert = self._load()
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lobsterd"),
                x509.NameAttribute(NameOID.COMMON_NAME, server_name),
            ]
        )
        cert = (
            self._leaf_builder(ca_cert, subject, key, days, ExtendedKeyUsageOID.SERVER_AUTH, now)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(server_name), x509.IPAddress(ip)]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        return IssuedCert(
            server_name=server_name,
            guest_ip=str(ip),
            cert_pem=_cert_pem(cert).decode("ascii"),
            key_pem=_key_pem(key).decode("ascii"),
            not_after=cert.not_valid_after_utc,
            serial=cert.serial_number,
        )

    def client_cert(self, *, now: dt.datetime | None = None) -> tuple[Path, Path]:
        """Caddy's client certificate and key files; issued once, rotated before expiry."""
        now = now or _now()
        if now.tzinfo is None:
            now = now.replace(tzinfo=dt.UTC)
        with self._locked():
            self._ensure_locked()
            ca_key, ca_cert = self._load()
            current = self._current_client(ca_cert, now)
            if current is not None:
                return current
            key = ec.generate_private_key(ec.SECP256R1())
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lobsterd"),
                    x509.NameAttribute(NameOID.COMMON_NAME, CLIENT_CN),
                ]
            )
            cert = (
                self._leaf_builder(
                    ca_cert,
                    subject,
                    key,
                    CLIENT_VALIDITY_DAYS,
                    ExtendedKeyUsageOID.CLIENT_AUTH,
                    now,
                )
                .add_extension(
                    x509.SubjectAlternativeName([x509.DNSName(CLIENT_SAN)]), critical=False
                )
                .sign(ca_key, hashes.SHA256())
            )
            stem = f"{_CLIENT_PREFIX}{cert.serial_number:040x}"
            cert_path = self.ca_dir / f"{stem}.pem"
            key_path = self.ca_dir / f"{stem}.key"
            gid = self._caddy_gid()
            # Key first: a certificate file only ever exists next to its key.
            _write_atomic(key_path, _key_pem(key), 0o640 if gid is not None else 0o600, gid)
            _write_atomic(cert_path, _cert_pem(cert), 0o644)
            self._prune_clients()
            return cert_path, key_path

    def _client_generations(self) -> list[tuple[dt.datetime, Path, Path]]:
        out = []
        for cert_path in self.ca_dir.glob(f"{_CLIENT_PREFIX}*.pem"):
            key_path = cert_path.with_suffix(".key")
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (OSError, ValueError):
                continue
            out.append((cert.not_valid_before_utc, cert_path, key_path))
        out.sort(key=lambda g: g[0], reverse=True)
        return out

    def _current_client(
        self, ca_cert: x509.Certificate, now: dt.datetime
    ) -> tuple[Path, Path] | None:
        for _, cert_path, key_path in self._client_generations():
            try:
                cert_pem = cert_path.read_bytes()
                key = _load_ec_key(key_path.read_bytes(), key_path)
                cert = x509.load_pem_x509_certificate(cert_pem)
            except (OSError, CaError, ValueError):
                continue
            if not _same_public_key(key, cert):
                continue
            if self._needs_rotation(cert, ca_cert, now, CLIENT_ROTATE_MARGIN_DAYS):
                return None
            return cert_path, key_path
        return None

    def _prune_clients(self) -> None:
        for _, cert_path, key_path in self._client_generations()[KEEP_CLIENT_GENERATIONS:]:
            for p in (cert_path, key_path):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # -- rotation ----------------------------------------------------------------------

    @staticmethod
    def _signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
        if cert.issuer != ca_cert.subject:
            return False
        pub = ca_cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or cert.signature_hash_algorithm is None:
            return False
        try:
            pub.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                ec.ECDSA(cert.signature_hash_algorithm),
            )
        except InvalidSignature:
            return False
        return True

    @classmethod
    def _needs_rotation(
        cls, cert: x509.Certificate, ca_cert: x509.Certificate, now: dt.datetime, margin: float
    ) -> bool:
        if not cls._signed_by(cert, ca_cert):
            return True
        return now + dt.timedelta(days=margin) >= cert.not_valid_after_utc

    def needs_rotation(
        self, cert_pem: str, now: dt.datetime | None = None, margin_days: float = 7
    ) -> bool:
        """True when ``cert_pem`` expires within ``margin_days`` of ``now``, is
        unreadable, or was not signed by the current host CA (e.g. after a CA reset)."""
        now = now or _now()
        if now.tzinfo is None:
            now = now.replace(tzinfo=dt.UTC)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return True
        return self._needs_rotation(cert, self.ca_certificate(), now, margin_days)
