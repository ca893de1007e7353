"""Host CA: issuance (SANs, EKUs, validity), files and modes, rotation, crash recovery."""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification as xv
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lobsterd.errors import CaError, ValidationFailed
from lobsterd.security.ca import (
    CLIENT_CN,
    GUEST_DOMAIN,
    KEEP_CLIENT_GENERATIONS,
    HostCA,
    guest_server_name,
)
from tests.helpers import need


@pytest.fixture
def ca(tmp_path: Path) -> HostCA:
    return HostCA(tmp_path / "ca", caddy_group=None)


def _cert(pem: str | bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode() if isinstance(pem, str) else pem)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _ekus(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def _verifier_store(ca: HostCA) -> xv.Store:
    return xv.Store([ca.ca_certificate()])


def test_ensure_creates_a_constrained_p256_ca_once(ca: HostCA) -> None:
    assert ca.ensure() is True
    first = ca.ca_file.read_bytes()
    assert ca.ensure() is False
    assert ca.ca_file.read_bytes() == first  # idempotent: same CA

    assert _mode(ca.key_file) == 0o600
    assert _mode(ca.ca_file) == 0o644
    assert _mode(ca.ca_dir) == 0o700
    cert = _cert(first)
    key = serialization.load_pem_private_key(ca.key_file.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    nc = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    permitted = nc.value.permitted_subtrees or []
    assert x509.DNSName("lobsterd.internal") in permitted
    assert x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")) in permitted
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3652)


def test_server_cert_has_exactly_the_guest_sans_and_server_eku(ca: HostCA) -> None:
    issued = ca.issue_server("demo", "10.200.0.6")
    cert = _cert(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [f"demo.{GUEST_DOMAIN}"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.200.0.6")]
    assert _ekus(cert) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    assert issued.server_name == guest_server_name("demo") == "demo.guest.lobsterd.internal"
    # The key returned is the certificate's key.
    key = serialization.load_pem_private_key(issued.key_pem.encode(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    # Validity: 30 days from now (started an hour ago for guest clock lag).
    now = dt.datetime.now(dt.UTC)
    assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=30))) < dt.timedelta(minutes=5)
    assert cert.not_valid_before_utc < now - dt.timedelta(minutes=50)
    assert issued.not_after == cert.not_valid_after_utc
    # The private key is not in the repr (it ends up in logs otherwise).
    assert "PRIVATE" not in repr(issued)


def test_server_cert_verifies_for_its_name_and_ip_only(ca: HostCA) -> None:
    cert = _cert(ca.issue_server("demo", "10.200.0.6").cert_pem)
    store = _verifier_store(ca)
    for subject in (
        x509.DNSName("demo.guest.lobsterd.internal"),
        x509.IPAddress(ipaddress.ip_address("10.200.0.6")),
    ):
        chain = xv.PolicyBuilder().store(store).build_server_verifier(subject).verify(cert, [])
        assert chain[-1] == ca.ca_certificate()
    for wrong in (
        x509.DNSName("other.guest.lobsterd.internal"),
        x509.IPAddress(ipaddress.ip_address("10.200.0.10")),
    ):
        with pytest.raises(xv.VerificationError):
            xv.PolicyBuilder().store(store).build_server_verifier(wrong).verify(cert, [])
    # A server certificate is no client credential.
    with pytest.raises(xv.VerificationError):
        xv.PolicyBuilder().store(store).build_client_verifier().verify(cert, [])


def test_each_issue_uses_a_fresh_key_and_writes_nothing(ca: HostCA) -> None:
    ca.ensure()
    before = sorted(p.name for p in ca.ca_dir.iterdir())
    a = ca.issue_server("demo", "10.200.0.6")
    b = ca.issue_server(guest_server_name("demo"), "10.200.0.6")  # full name accepted too
    assert a.key_pem != b.key_pem and a.serial != b.serial
    assert a.server_name == b.server_name
    assert sorted(p.name for p in ca.ca_dir.iterdir()) == before


@pytest.mark.parametrize(
    ("tenant", "ip", "days"),
    [
        ("Bad_Name", "10.200.0.6", 30),
        ("demo.evil.com", "10.200.0.6", 30),
        ("demo", "not-an-ip", 30),
        ("demo", "8.8.8.8", 30),  # outside the CA's name constraints
        ("demo", "10.200.0.6", 0),
        ("demo", "10.200.0.6", 400),
    ],
)
def test_issue_server_rejects_bad_input(ca: HostCA, tenant: str, ip: str, days: int) -> None:
    with pytest.raises(ValidationFailed):
        ca.issue_server(tenant, ip, days=days)


def test_client_cert_is_issued_once_with_client_eku(ca: HostCA) -> None:
    cert_path, key_path = ca.client_cert()
    assert ca.client_cert() == (cert_path, key_path)
    cert = _cert(cert_path.read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == CLIENT_CN
    assert _ekus(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    verified = (
        xv.PolicyBuilder().store(_verifier_store(ca)).build_client_verifier().verify(cert, [])
    )
    assert verified.chain[-1] == ca.ca_certificate()
    assert _mode(key_path) == 0o600  # no caddy group configured
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    # Never usable as a server.
    with pytest.raises(xv.VerificationError):
        xv.PolicyBuilder().store(_verifier_store(ca)).build_server_verifier(
            x509.DNSName("caddy.lobsterd.internal")
        ).verify(cert, [])


def test_client_key_is_group_readable_by_the_caddy_group(tmp_path: Path) -> None:
    need(os.geteuid() == 0, "setting a file's group to another group needs root")
    need(_gid_exists(65534), "no gid 65534 group to stand in for caddy")
    group = grp.getgrgid(65534).gr_name
    ca = HostCA(tmp_path / "ca", caddy_group=group)
    _, key_path = ca.client_cert()
    st = key_path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_uid == 0 and st.st_gid == 65534
    assert _mode(ca.key_file) == 0o600 and ca.key_file.stat().st_gid == 0
    d = ca.ca_dir.stat()
    assert stat.S_IMODE(d.st_mode) == 0o750 and d.st_gid == 65534


def _gid_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def test_client_cert_rotates_before_expiry_and_keeps_recent_generations(ca: HostCA) -> None:
    first = ca.client_cert()
    now = dt.datetime.now(dt.UTC)
    # 59 days later: 31 days left, still fine.
    assert ca.client_cert(now=now + dt.timedelta(days=59)) == first
    # 61 days later: under the 30-day margin, so a new generation with a new path.
    second = ca.client_cert(now=now + dt.timedelta(days=61))
    assert second != first and second[0].exists() and first[0].exists()
    gens = [first, second]
    for i in range(1, 4):
        gens.append(ca.client_cert(now=now + dt.timedelta(days=61 * (i + 1))))
    pems = sorted(ca.ca_dir.glob("caddy-client-*.pem"))
    assert len(pems) == KEEP_CLIENT_GENERATIONS
    assert {p for p, _ in gens[-KEEP_CLIENT_GENERATIONS:]} == set(pems)
    assert not first[0].exists() and not first[1].exists()


def test_needs_rotation(ca: HostCA) -> None:
    pem = ca.issue_server("demo", "10.200.0.6", days=30).cert_pem
    not_after = _cert(pem).not_valid_after_utc
    assert ca.needs_rotation(pem, dt.datetime.now(dt.UTC)) is False
    assert ca.needs_rotation(pem, not_after - dt.timedelta(days=8)) is False
    assert ca.needs_rotation(pem, not_after - dt.timedelta(days=6)) is True
    assert ca.needs_rotation(pem, not_after - dt.timedelta(days=6), margin_days=1) is False
    assert ca.needs_rotation(pem, not_after + dt.timedelta(seconds=1)) is True
    assert ca.needs_rotation("not a certificate", dt.datetime.now(dt.UTC)) is True
    # Signed by a different CA (e.g. the CA was recreated): rotate.
    other = HostCA(ca.ca_dir.parent / "other", caddy_group=None)
    foreign = other.issue_server("demo", "10.200.0.6").cert_pem
    assert ca.needs_rotation(foreign, dt.datetime.now(dt.UTC)) is True


def test_key_without_certificate_is_a_crash_and_is_recreated(ca: HostCA) -> None:
    ca.ensure()
    ca.ca_file.unlink()
    assert ca.ensure() is True
    ca.issue_server("demo", "10.200.0.6")


def test_certificate_without_key_is_an_error_not_a_silent_new_ca(ca: HostCA) -> None:
    ca.ensure()
    ca.key_file.unlink()
    with pytest.raises(CaError, match="missing"):
        ca.ensure()
    assert ca.ca_file.exists()


def test_mismatched_key_is_detected(ca: HostCA) -> None:
    ca.ensure()
    stray = ec.generate_private_key(ec.SECP256R1())
    ca.key_file.write_bytes(
        stray.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CaError, match="does not match"):
        ca.issue_server("demo", "10.200.0.6")


def test_concurrent_ensure_makes_one_ca(tmp_path: Path) -> None:
    cas = [HostCA(tmp_path / "ca", caddy_group=None) for _ in range(6)]
    created: list[bool] = []
    barrier = threading.Barrier(len(cas))

    def go(c: HostCA) -> None:
        barrier.wait()
        created.append(c.ensure())

    threads = [threading.Thread(target=go, args=(c,)) for c in cas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert created.count(True) == 1
    pems = {c.ca_pem() for c in cas}
    assert len(pems) == 1


def test_leaf_signatures_are_from_the_ca_key(ca: HostCA) -> None:
    issued = ca.issue_server("demo", "10.200.0.6")
    cert = _cert(issued.cert_pem)
    pub = ca.ca_certificate().public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.ca_certificate().extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
