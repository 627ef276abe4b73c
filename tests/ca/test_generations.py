"""CA rollover in the authority, no server: families and which generation issues when,
old certificates authenticating, each generation's records and CRL, the config that
declares it, and the next generation's certificate (ca/generations.py, ca/rotation.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509

from caenv import BOOTSTRAP, NOW, Cas, label, make_csr, refused
from estkit.ca.authority import Authority, IssuingCa
from estkit.ca.constraints import check_chain
from estkit.ca.errors import Code
from estkit.ca.generations import FIRST, Generation, family_names, generation_name, lineages
from estkit.ca.rotation import check_switch, issue_successor, successor_subject
from estkit.ca.signers import load_cas
from estkit.pki.certs import certs_to_pem
from estkit.pki.keys import generate_key, key_to_pem
from estkit.pki.profiles import issue_ca
from estkit.server.config import ConfigError, parse_config
from estkit.store import SqlStore
from testpki import cn_name

SWITCH = NOW + dt.timedelta(days=1)
AFTER = SWITCH + dt.timedelta(seconds=1)


def _successor(cas: Cas, replaced: IssuingCa, name: str, start: dt.datetime) -> IssuingCa:
    key = generate_key("ec-p256")
    cert = issue_successor(
        replaced=replaced.cert,
        subject=successor_subject(replaced.cert.subject, 2),
        public_key=key.public_key(),
        root=cas.root.cert,
        root_key=cas.root.key,
        now=NOW - dt.timedelta(hours=1),
    )
    return IssuingCa(
        name=name,
        cert=cert,
        key=key,
        chain=(cert, cas.root.cert),
        generation=Generation(replaces=replaced.name, issues_from=start),
    )


@pytest.fixture(scope="module")
def devices_2(cas: Cas) -> IssuingCa:
    return _successor(cas, cas.devices, "devices-2", SWITCH)


@pytest.fixture(scope="module")
def bootstrap_2(cas: Cas) -> IssuingCa:
    return _successor(cas, cas.bootstrap, "bootstrap-2", SWITCH)


@pytest.fixture
def rolling(
    cas: Cas, devices_2: IssuingCa, bootstrap_2: IssuingCa, store: SqlStore
) -> Authority[SqlStore]:
    revoked: list[list[str]] = []
    authority = Authority(
        cas={
            "root": cas.root,
            "devices": cas.devices,
            "bootstrap": cas.bootstrap,
            "devices-2": devices_2,
            "bootstrap-2": bootstrap_2,
        },
        labels={"devices": label()},
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
        on_revocation=lambda names, now: revoked.append(list(names)),
    )
    authority.revoked_names = revoked  # type: ignore[attr-defined]
    return authority


# -- families ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replaces", "families"),
    [
        ({"devices": None}, {"devices": "devices"}),
        ({"devices": None, "devices-2": "devices"}, {"devices": "devices", "devices-2": "devices"}),
        # The first generation removed from the config: the family keeps its name.
        ({"devices-2": "devices", "devices-3": "devices-2"},
         {"devices-2": "devices", "devices-3": "devices"}),
    ],
    ids=["ok/one", "ok/two", "ok/first-removed"],
)  # fmt: skip
def test_a_family_is_named_after_its_first_generation(
    replaces: dict[str, str | None], families: dict[str, str]
) -> None:
    assert family_names(replaces) == families


@pytest.mark.parametrize(
    ("replaces", "message"),
    [
        ({"a": "a"}, "cannot replace itself"),
        ({"a": "b", "b": "a"}, "loop"),
        ({"a": None, "b": "a", "c": "a"}, "replaces 'a' already"),
    ],
    ids=["fail/itself", "fail/loop", "fail/two-successors"],
)
def test_families_that_cannot_be(replaces: dict[str, str | None], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        family_names(replaces)


def test_the_next_generation_takes_the_first_free_number() -> None:
    assert generation_name("devices", {"devices"}) == "devices-2"
    assert generation_name("devices", {"devices", "devices-2", "devices-3"}) == "devices-4"


def test_the_newest_generation_whose_moment_has_come_issues() -> None:
    later = SWITCH + dt.timedelta(days=30)
    lineage = lineages(
        {"d": "one", "d-2": "two", "d-3": "three"},
        {
            "d": FIRST,
            "d-2": Generation(replaces="d", issues_from=SWITCH),
            "d-3": Generation(replaces="d-2", issues_from=later),
        },
    )["d"]
    assert lineage.issuing(NOW) == ("d", "one")
    assert lineage.issuing(SWITCH) == ("d-2", "two")
    assert lineage.issuing(later) == ("d-3", "three")


# -- the authority across the switch -----------------------------------------------------


def test_before_the_switch_the_old_generation_issues_and_cacerts_is_its_chain(
    rolling: Authority[SqlStore], cas: Cas, devices_2: IssuingCa
) -> None:
    devices = rolling.labels["devices"]
    assert rolling.chain_for(devices, now=NOW) == cas.devices.chain
    assert rolling.chain_for(devices, now=SWITCH) == devices_2.chain
    boot = rolling.issue_bootstrap(
        make_csr(generate_key("ec-p256")), device_id="dev-1", actor="t", now=NOW
    )
    who = rolling.authenticate_certificate(boot.certificate, now=NOW)
    issued = rolling.enroll(devices, make_csr(generate_key("ec-p256")), who, now=NOW)
    assert issued.record.ca == "devices" and issued.certificate.issuer == cas.devices.cert.subject
    assert issued.chain == cas.devices.chain


def test_an_old_certificate_renews_into_the_new_generation_after_the_switch(
    rolling: Authority[SqlStore], cas: Cas, devices_2: IssuingCa
) -> None:
    devices = rolling.labels["devices"]
    key = generate_key("ec-p256")
    boot = rolling.issue_bootstrap(make_csr(key), device_id="dev-1", actor="t", now=NOW)
    old = rolling.enroll(
        devices, make_csr(key), rolling.authenticate_certificate(boot.certificate, now=NOW), now=NOW
    )
    who = rolling.authenticate_certificate(old.certificate, now=AFTER)
    assert who.cert_ca == "devices"  # the family: what labels and policy name
    new = rolling.reenroll(devices, make_csr(key), who, now=AFTER)
    assert new.record.ca == "devices-2" and new.chain == devices_2.chain
    assert new.certificate.issuer == devices_2.cert.subject
    # The new one renews itself, and a bootstrap certificate of the old bootstrap CA
    # still enrolls, from devices-2; the factory's new ones come from bootstrap-2.
    again = rolling.reenroll(
        devices, make_csr(key), rolling.authenticate_certificate(new.certificate, now=AFTER),
        now=AFTER,
    )  # fmt: skip
    assert again.record.ca == "devices-2"
    late = rolling.enroll(
        devices, make_csr(key), rolling.authenticate_certificate(boot.certificate, now=AFTER),
        now=AFTER,
    )  # fmt: skip
    assert late.record.ca == "devices-2"
    second = rolling.issue_bootstrap(
        make_csr(key, "dev-2"), device_id="dev-2", actor="t", now=AFTER
    )
    assert second.record.ca == "bootstrap-2"


def test_a_bootstrap_certificate_of_either_generation_counts_as_the_devices_one(
    rolling: Authority[SqlStore],
) -> None:
    key = generate_key("ec-p256")
    rolling.issue_bootstrap(make_csr(key), device_id="dev-1", actor="t", now=NOW)
    refused(
        Code.CONFLICT,
        lambda: rolling.issue_bootstrap(make_csr(key), device_id="dev-1", actor="t", now=AFTER),
    )
    replaced = rolling.issue_bootstrap(
        make_csr(key), device_id="dev-1", actor="t", now=AFTER, replace=True
    )
    assert replaced.record.ca == "bootstrap-2" and len(replaced.replaces_serials) == 1


def test_each_generation_keeps_its_own_revocations(
    rolling: Authority[SqlStore], store: SqlStore
) -> None:
    devices = rolling.labels["devices"]
    key = generate_key("ec-p256")
    boot = rolling.issue_bootstrap(make_csr(key), device_id="dev-1", actor="t", now=NOW)
    who = rolling.authenticate_certificate(boot.certificate, now=NOW)
    old = rolling.enroll(devices, make_csr(key), who, now=NOW)
    new = rolling.enroll(devices, make_csr(key), who, now=AFTER)
    rolling.revoke(old.record.serial, reason="superseded", actor="t", now=AFTER)
    assert [s for s, _, _ in store.revoked_certificates("devices")] == [old.record.serial]
    assert store.revoked_certificates("devices-2") == []
    assert rolling.revoked_names[-1] == ["devices"]  # type: ignore[attr-defined]
    refused(Code.REVOKED, lambda: rolling.authenticate_certificate(old.certificate, now=AFTER))
    assert rolling.authenticate_certificate(new.certificate, now=AFTER).cert_ca == "devices"


def test_the_new_generations_name_constraints_apply_from_the_switch(
    cas: Cas, store: SqlStore
) -> None:
    key = generate_key("ec-p256")
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(cn_name("devices G2"))
        .issuer_name(cas.root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(constraints, critical=True)
        .sign(cas.root.key, cas.root.cert.signature_hash_algorithm)  # type: ignore[arg-type]
    )
    constrained = IssuingCa(
        name="devices-2",
        cert=cert,
        key=key,
        chain=(cert, cas.root.cert),
        generation=Generation(replaces="devices", issues_from=SWITCH),
    )
    authority = Authority(
        cas={"root": cas.root, "devices": cas.devices, "bootstrap": cas.bootstrap,
             "devices-2": constrained},
        labels={"devices": label()},
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
    )  # fmt: skip
    outside = [x509.DNSName("dev-1.example.org")]
    boot = authority.issue_bootstrap(make_csr(key), device_id="dev-1", actor="t", now=NOW)
    who = authority.authenticate_certificate(boot.certificate, now=NOW)
    devices = authority.labels["devices"]
    # dev-1 as a CN reads as a host name outside example.com: devices-2 refuses it.
    authority.enroll(devices, make_csr(key, sans=outside), who, now=NOW)
    refused(
        Code.NAME_CONSTRAINTS,
        lambda: authority.enroll(devices, make_csr(key, sans=outside), who, now=AFTER),
    )


def test_a_label_naming_a_later_generation_issues_from_its_family(
    cas: Cas, devices_2: IssuingCa, store: SqlStore
) -> None:
    authority = Authority(
        cas={"root": cas.root, "devices": cas.devices, "bootstrap": cas.bootstrap,
             "devices-2": devices_2},
        labels={"devices": label(ca="devices-2")},
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
    )  # fmt: skip
    devices = authority.labels["devices"]
    assert devices.ca == "devices"
    assert authority.issuing_ca(devices, now=NOW).name == "devices"
    assert authority.issuing_ca(devices, now=AFTER).name == "devices-2"


# -- loading: an expired, replaced generation is left out ----------------------------------


def _spec(tmp: Path, ca: IssuingCa, generation: Generation = FIRST) -> object:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Spec:
        signer: str
        cert: Path
        key_file: Path | None
        token: None = None
        generation: Generation = FIRST

    cert, key = tmp / f"{ca.name}.pem", tmp / f"{ca.name}.key"
    cert.write_bytes(certs_to_pem([ca.cert]))
    key.write_bytes(key_to_pem(ca.key))
    return Spec(signer="file", cert=cert, key_file=key, generation=generation)


def _short_lived(cas: Cas, name: str, days: int) -> IssuingCa:
    key = generate_key("ec-p256")
    cert = issue_ca(
        subject=cn_name(f"test {name}"),
        public_key=key.public_key(),
        issuer=cas.root.cert,
        issuer_key=cas.root.key,
        validity=dt.timedelta(days=days),
        now=NOW - dt.timedelta(days=days + 1),
        path_length=0,
    )
    return IssuingCa(name=name, cert=cert, key=key, chain=(cert, cas.root.cert))


def test_an_expired_generation_is_left_out_once_replaced_and_refused_otherwise(
    tmp_path: Path, cas: Cas, devices_2: IssuingCa, caplog: pytest.LogCaptureFixture
) -> None:
    expired = _short_lived(cas, "devices", 10)
    replaced_now = Generation(replaces="devices", issues_from=NOW - dt.timedelta(days=2))
    specs = {
        "root": _spec(tmp_path, cas.root),
        "devices": _spec(tmp_path, expired),
        "devices-2": _spec(tmp_path, devices_2, replaced_now),
    }
    loaded = load_cas(specs, environ={}, now=NOW)  # type: ignore[arg-type]
    assert set(loaded) == {"root", "devices-2"}
    assert "keep its [cas.devices] table" in caplog.text
    # Its successor not issuing yet: the expired CA would have to, and cannot.
    specs["devices-2"] = _spec(tmp_path, devices_2, replace(replaced_now, issues_from=SWITCH))
    with pytest.raises(ValueError, match="devices"):
        load_cas(specs, environ={}, now=NOW)  # type: ignore[arg-type]


# -- the next generation's certificate ------------------------------------------------------


def test_the_next_generation_has_a_new_name_the_old_lifetime_and_the_same_root(
    cas: Cas, devices_2: IssuingCa
) -> None:
    old, new = cas.devices.cert, devices_2.cert
    assert new.subject.rfc4514_string() == "CN=test devices G2"
    assert successor_subject(new.subject, 3).rfc4514_string() == "CN=test devices G3"
    assert new.issuer == old.issuer
    # As long as the old one, but never beyond the root (here both end with the root).
    assert new.not_valid_after_utc == cas.root.cert.not_valid_after_utc
    shorter = _short_lived(cas, "devices", 30)
    shorter_new = issue_successor(
        replaced=shorter.cert,
        subject=new.subject,
        public_key=devices_2.key.public_key(),
        root=cas.root.cert,
        root_key=cas.root.key,
        now=NOW,
    )
    old_life = shorter.cert.not_valid_after_utc - shorter.cert.not_valid_before_utc
    assert shorter_new.not_valid_after_utc - shorter_new.not_valid_before_utc == old_life
    check_chain("devices-2", devices_2.chain, now=NOW)
    with pytest.raises(ValueError, match="not issued by the root"):
        issue_successor(
            replaced=cas.root.cert,
            subject=new.subject,
            public_key=devices_2.key.public_key(),
            root=cas.devices.cert,
            root_key=cas.devices.key,
            now=NOW,
        )


def test_a_switch_after_the_old_generation_expires_is_refused(cas: Cas) -> None:
    check_switch(cas.devices.cert, SWITCH, now=NOW)
    late = cas.devices.cert.not_valid_after_utc + dt.timedelta(days=1)
    with pytest.raises(ValueError, match="choose an earlier --issues-from"):
        check_switch(cas.devices.cert, late, now=NOW)


# -- the config that declares a rotation ------------------------------------------------------


def _config(tmp_path: Path, extra: str, label_ca: str = "devices") -> object:
    import tomllib

    text = f"""
[cas.root]
cert = "ca/root.pem"
key = "ca/root.key"
[cas.devices]
cert = "ca/devices.pem"
key = "ca/devices.key"
[cas.bootstrap]
cert = "ca/bootstrap.pem"
key = "ca/bootstrap.key"
{extra}
[profiles.operational]
kind = "operational"
validity = "30d"
[profiles.bootstrap]
kind = "bootstrap"
validity = "10y"
[labels.devices]
ca = "{label_ca}"
profile = "operational"
"""
    return parse_config(tomllib.loads(text), tmp_path)


def test_a_rotation_in_the_config(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        '[cas.devices-2]\ncert = "ca/devices-2.pem"\nkey = "ca/devices-2.key"\n'
        'replaces = "devices"\nissues_from = 2027-01-15T01:00:00+01:00\n',
        label_ca="devices-2",
    )
    generation = config.cas["devices-2"].generation  # type: ignore[attr-defined]
    assert generation == Generation(
        replaces="devices", issues_from=dt.datetime(2027, 1, 15, tzinfo=dt.UTC)
    )
    assert config.labels["devices"].ca == "devices"  # type: ignore[attr-defined]


def _table(name: str = "devices-2", **settings: str) -> str:
    lines = [f"[cas.{name}]", 'cert = "a"', 'key = "b"']
    return "\n".join([*lines, *(f"{k} = {v}" for k, v in settings.items())]) + "\n"


MOMENT = "2027-01-15T00:00:00Z"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (_table(replaces='"devices"'), "issues_from: required"),
        (_table(issues_from=MOMENT), "only with replaces"),
        (_table(replaces='"devices"', issues_from=MOMENT[:-1]), "with its offset"),
        (_table(replaces='"root"', issues_from=MOMENT), "the root is not rotated"),
        (
            _table(replaces='"devices"', issues_from=MOMENT)
            + _table("devices-3", replaces='"devices"', issues_from=MOMENT),
            "replaces 'devices' already",
        ),
        (_table('"dev ices"'), "CA names are"),
    ],
    ids=[
        "fail/no-moment",
        "fail/moment-alone",
        "fail/naive-moment",
        "fail/root",
        "fail/two-successors",
        "fail/name",
    ],
)
def test_rotations_the_config_refuses(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, extra)


def test_a_node_that_has_not_loaded_a_generation_leaves_its_crl_to_the_others(
    cas: Cas, store: SqlStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from estkit.ca.crl import CrlPublisher

    publisher = CrlPublisher(
        cas={"devices": cas.devices}, store=store, directory=tmp_path, validity=dt.timedelta(days=1)
    )
    # A revocation committed on this node of a devices-2 certificate another node issued.
    publisher.publish_all(now=NOW, names=["devices-2", "devices"])
    assert (tmp_path / "devices.crl").exists() and not (tmp_path / "devices-2.crl").exists()
    assert "CRL of CA devices-2 not republished here" in caplog.text


def test_an_expired_issuing_ca_refuses_to_issue_instead_of_inverting_validity(
    cas: Cas, store: SqlStore
) -> None:
    expired = _short_lived(cas, "devices", 10)
    authority = Authority(
        cas={"root": cas.root, "devices": expired, "bootstrap": cas.bootstrap},
        labels={"devices": label()},
        bootstrap_profile=BOOTSTRAP,
        store=store,
        secret_validity=dt.timedelta(days=7),
    )
    key = generate_key("ec-p256")
    boot = authority.issue_bootstrap(make_csr(key), device_id="dev-1", actor="t", now=NOW)
    who = authority.authenticate_certificate(boot.certificate, now=NOW)
    refusal = refused(
        Code.UNAVAILABLE,
        lambda: authority.enroll(authority.labels["devices"], make_csr(key), who, now=NOW),
    )
    assert "expired" in refusal.reason and "estkit ca rotate" in refusal.reason
    assert store.certificates_of("dev-1") == [boot.record]
