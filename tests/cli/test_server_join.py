"""``estkit server init --join``: another node's data directory from an existing node's,
and a node name being one node's when the nodes run."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from backends import postgresql_only
from estkit.server.portal.session import KEY_FILE, SessionSigner, load_or_create_key
from estkit.store import ApiToken, Node, SqlStore
from estserver import EstServer, free_ports, run_estkit, set_config

CA_NAMES = ("root", "devices", "bootstrap")
NOW = dt.datetime(2026, 12, 10, 12, 0, tzinfo=dt.UTC)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _first_node(tmp_path: Path, database_url: str) -> Path:
    data_dir = tmp_path / "eu-1"
    port, crl_port = free_ports(2)
    run_estkit(
        "server", "init", "--data-dir", data_dir, "--port", str(port),
        "--crl-port", str(crl_port), "--database-url",
        database_url.replace("postgresql+psycopg://", "postgresql://"),
        "--region", "eu", "--node-name", "eu-1",
    )  # fmt: skip
    return data_dir


def _join(source: Path, target: Path, *, check: bool = True) -> CompletedProcess[str]:
    """``server init --join`` of node us-1 in region us."""
    port, crl_port = free_ports(2)
    return run_estkit(
        "server", "init", "--data-dir", target, "--join", source, "--region", "us",
        "--public-url", f"https://us.example:{port}", "--port", str(port),
        "--crl-port", str(crl_port), "--node-name", "us-1", check=check,
    )  # fmt: skip


def _ports(data_dir: Path) -> tuple[int, int]:
    config = tomllib.loads((data_dir / "estkit.toml").read_text())
    return config["server"]["port"], config["crl"]["http_port"]


def test_join_refuses_a_node_on_sqlite(tmp_path: Path) -> None:
    source = tmp_path / "one"
    run_estkit("server", "init", "--data-dir", source, "--port", str(free_ports(1)[0]))
    joined = run_estkit(
        "server", "init", "--data-dir", tmp_path / "two", "--join", source,
        "--region", "us", "--port", str(free_ports(1)[0]), check=False,
    )  # fmt: skip
    assert joined.returncode == 78
    assert "uses SQLite; nodes need one shared PostgreSQL database" in joined.stderr
    assert len(joined.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one"]


@postgresql_only
def test_join_copies_the_cas_and_tls_material_and_writes_the_nodes_own_config(
    database_url: str, tmp_path: Path
) -> None:
    source = _first_node(tmp_path, database_url)
    target = tmp_path / "us-1"
    port, crl_port = free_ports(2)
    out = run_estkit(
        "server", "init", "--data-dir", target, "--join", source, "--region", "us",
        "--public-url", f"https://us.example:{port}", "--port", str(port),
        "--crl-port", str(crl_port), "--node-name", "us-1",
    ).stdout  # fmt: skip
    assert "database: shared with the joined node, not migrated" in out
    for name in CA_NAMES:
        for suffix in (".pem", ".key"):
            copy = target / "ca" / f"{name}{suffix}"
            assert copy.read_bytes() == (source / "ca" / f"{name}{suffix}").read_bytes()
        assert _mode(target / "ca" / f"{name}.key") == 0o600
        assert _mode(target / "ca" / f"{name}.pem") == 0o644
    assert _mode(target / "tls" / "server.key") == 0o600
    assert _mode(target / "tls" / "server.pem") == 0o644
    assert (_mode(target), _mode(target / "estkit.toml")) == (0o700, 0o600)
    assert (target / "tls" / "server.pem").read_bytes() == (
        source / "tls" / "server.pem"
    ).read_bytes()
    config = tomllib.loads((target / "estkit.toml").read_text())
    first = tomllib.loads((source / "estkit.toml").read_text())
    assert config["database"]["url"] == first["database"]["url"]
    assert config["node"] == {"name": "us-1", "region": "us"}
    assert config["server"]["port"] == port
    assert config["server"]["public_url"] == f"https://us.example:{port}"
    assert config["crl"]["http_port"] == crl_port
    assert first["node"] == {"name": "eu-1", "region": "eu"}
    assert not (target / "estkit.db").exists()


@postgresql_only
def test_join_names_each_copy_by_its_ca_when_their_files_share_a_name(
    database_url: str, tmp_path: Path
) -> None:
    """Two CAs whose files are both called ca.pem / ca.key (one beside the data
    directory, one inside it) get a copy each, not one over the other."""
    source = _first_node(tmp_path, database_url)
    originals = {n: (source / "ca" / f"{n}.pem").read_bytes() for n in CA_NAMES}
    keys = {n: (source / "ca" / f"{n}.key").read_bytes() for n in CA_NAMES}
    for ca, place in (("devices", tmp_path / "hsm-export"), ("bootstrap", source / "factory")):
        place.mkdir()
        for suffix in (".pem", ".key"):
            (source / "ca" / f"{ca}{suffix}").rename(place / f"ca{suffix}")
        where = place if place.parent != source else place.relative_to(source)
        set_config(source, f"cas.{ca}", "cert", json.dumps(f"{where}/ca.pem"))
        set_config(source, f"cas.{ca}", "key", json.dumps(f"{where}/ca.key"))
    target = tmp_path / "us-1"

    _join(source, target)

    config = tomllib.loads((target / "estkit.toml").read_text())
    for name in CA_NAMES:
        assert (target / "ca" / f"{name}.pem").read_bytes() == originals[name]
        assert (target / "ca" / f"{name}.key").read_bytes() == keys[name]
        assert config["cas"][name] == {
            "cert": f"ca/{name}.pem",
            "key": f"ca/{name}.key",
            "signer": "file",
        }
    assert sorted(p.name for p in (target / "ca").iterdir()) == sorted(
        f"{n}{s}" for n in CA_NAMES for s in (".pem", ".key")
    )


@postgresql_only
def test_join_copies_the_oidc_key_set_the_config_names(database_url: str, tmp_path: Path) -> None:
    source = _first_node(tmp_path, database_url)
    (source / "oidc").mkdir()
    (source / "oidc" / "keys.json").write_text('{"keys": []}')
    with (source / "estkit.toml").open("a") as config:
        config.write('\n[api.oidc]\njwks_file = "oidc/keys.json"\n')
    target = tmp_path / "us-1"

    out = _join(source, target).stdout

    assert "copied 9 files" in out
    assert "into api/, ca/, tls/" in out
    assert (target / "api" / "jwks.json").read_text() == '{"keys": []}'
    assert _mode(target / "api" / "jwks.json") == 0o644
    config = tomllib.loads((target / "estkit.toml").read_text())
    assert config["api"]["oidc"]["jwks_file"] == "api/jwks.json"


@postgresql_only
def test_join_copies_the_portals_oidc_client_secret_privately(
    database_url: str, tmp_path: Path
) -> None:
    source = _first_node(tmp_path, database_url)
    (source / "oidc").mkdir()
    (source / "oidc" / "keys.json").write_text('{"keys": []}')
    (source / "oidc" / "portal.secret").write_text("s3cret\n")
    with (source / "estkit.toml").open("a") as config:
        config.write(
            '\n[api.oidc]\nissuer = "https://idp.example"\naudience = "api://estkit"\n'
            'jwks_file = "oidc/keys.json"\nportal_client_id = "estkit-portal"\n'
            'portal_client_secret_file = "oidc/portal.secret"\n'
            '[api.oidc.clients]\n"alice" = ["admin"]\n'
        )
    target = tmp_path / "us-1"

    _join(source, target)

    copy = target / "api" / "portal-client.secret"
    assert copy.read_text() == "s3cret\n" and _mode(copy) == 0o600
    config = tomllib.loads((target / "estkit.toml").read_text())
    assert config["api"]["oidc"]["portal_client_secret_file"] == "api/portal-client.secret"


@postgresql_only
def test_join_copies_a_token_cas_pin_file_not_its_module(database_url: str, tmp_path: Path) -> None:
    """A CA whose key is in a PKCS#11 token: its certificate and PIN file are copied
    (the PIN 0600), the module stays the host's library; nothing is loaded."""
    source = _first_node(tmp_path, database_url)
    (source / "secrets").mkdir()
    (source / "secrets" / "token.pin").write_text("4711\n")
    config_path = source / "estkit.toml"
    text = config_path.read_text()
    file_ca = '[cas.devices]\ncert = "ca/devices.pem"\nkey = "ca/devices.key"\nsigner = "file"\n'
    assert file_ca in text
    config_path.write_text(
        text.replace(
            file_ca,
            '[cas.devices]\ncert = "ca/devices.pem"\nsigner = "pkcs11"\n'
            'module = "/usr/lib/softhsm/libsofthsm2.so"\ntoken_label = "estkit"\n'
            'key_label = "devices"\npin_file = "secrets/token.pin"\n',
        )
    )
    target = tmp_path / "us-1"

    _join(source, target)

    assert (target / "ca" / "devices.pin").read_text() == "4711\n"
    assert _mode(target / "ca" / "devices.pin") == 0o600
    assert not (target / "ca" / "devices.key").exists()
    devices = tomllib.loads((target / "estkit.toml").read_text())["cas"]["devices"]
    assert devices["pin_file"] == "ca/devices.pin"
    assert devices["module"] == "/usr/lib/softhsm/libsofthsm2.so"


def _symlinked_key(source: Path, _tmp: Path) -> str:
    key = source / "ca" / "root.key"
    key.rename(source / "ca" / "real-root.key")
    key.symlink_to("real-root.key")
    return f"cas.root.key: {key}: a symbolic link on its path (not followed"


def _symlinked_directory(source: Path, tmp: Path) -> str:
    (source / "tls").rename(tmp / "tls-elsewhere")
    (source / "tls").symlink_to(tmp / "tls-elsewhere")
    return f"tls.cert: {source / 'tls' / 'server.pem'}: a symbolic link on its path"


def _dotdot(source: Path, tmp: Path) -> str:
    (tmp / "keys").mkdir()
    shutil.copy(source / "ca" / "root.key", tmp / "keys" / "root.key")
    set_config(source, "cas.root", "key", '"../keys/root.key"')
    return f"cas.root.key: {source}/../keys/root.key: a path with '..' (not followed"


def _fifo(source: Path, _tmp: Path) -> str:
    key = source / "ca" / "devices.key"
    key.unlink()
    os.mkfifo(key)
    return f"cas.devices.key: {key}: not a regular file"


def _non_empty_target(_source: Path, tmp: Path) -> str:
    (tmp / "us-1").mkdir()
    (tmp / "us-1" / "notes.txt").write_text("mine\n")
    return f"--data-dir: {tmp / 'us-1'} exists and is not empty"


def _symlinked_session_key(source: Path, tmp: Path) -> str:
    key = source / KEY_FILE
    key.rename(tmp / "session.key")
    key.symlink_to(tmp / "session.key")
    return f"{KEY_FILE}: {key}: a symbolic link on its path"


def _odd_ca_name(source: Path, _tmp: Path) -> str:
    with (source / "estkit.toml").open("a") as config:
        config.write('\n[cas."x y"]\ncert = "ca/root.pem"\nkey = "ca/root.key"\n')
    # Refused by the config itself: a CA's files are named after it (ca/<name>.pem).
    return "cas.x y: CA names are 1-64 letters, digits, '-' or '_'"


@postgresql_only
@pytest.mark.parametrize(
    "prepare",
    [
        _symlinked_key,
        _symlinked_directory,
        _dotdot,
        _fifo,
        _non_empty_target,
        _odd_ca_name,
        _symlinked_session_key,
    ],
    ids=[
        "fail/symlinked-key",
        "fail/symlinked-directory",
        "fail/dotdot-path",
        "fail/fifo-for-a-key",
        "fail/non-empty-target",
        "fail/ca-name-not-a-file-name",
        "fail/symlinked-portal-session-key",
    ],
)
def test_join_refuses_in_one_line_and_writes_nothing(
    database_url: str, tmp_path: Path, prepare: Callable[[Path, Path], str]
) -> None:
    source = _first_node(tmp_path, database_url)
    expected = prepare(source, tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    joined = _join(source, tmp_path / "us-1", check=False)

    assert joined.returncode == 78, joined.stderr
    assert len(joined.stderr.strip().splitlines()) == 1, joined.stderr
    assert joined.stderr.startswith("estkit: ")
    assert expected in joined.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@postgresql_only
def test_join_copies_the_portal_session_key_so_the_nodes_share_sessions(
    database_url: str, tmp_path: Path
) -> None:
    source = _first_node(tmp_path, database_url)
    assert _mode(source / KEY_FILE) == 0o600  # made by init, before any server ran
    target = tmp_path / "us-1"

    out = _join(source, target).stdout

    assert f"portal: copied {KEY_FILE} (0600): the nodes share portal sessions" in out
    assert (target / KEY_FILE).read_bytes() == (source / KEY_FILE).read_bytes()
    assert _mode(target / KEY_FILE) == 0o600
    token = ApiToken(
        id=1, name="ops", token_hash="ab" * 32, scopes=frozenset({"admin"}), created_by="t",
        created_at=NOW, expires_at=None, revoked_at=None, last_used_at=None,
    )  # fmt: skip
    cookie, session = SessionSigner(load_or_create_key(source)).issue(token, now=NOW)
    other = SessionSigner(load_or_create_key(target))
    assert other.verify(cookie, token) and other.parse(cookie, now=NOW) == session


@postgresql_only
def test_join_from_a_node_without_a_session_key_says_each_node_keeps_its_own(
    database_url: str, tmp_path: Path
) -> None:
    """A data directory made before the portal, whose server has not run since."""
    source = _first_node(tmp_path, database_url)
    (source / KEY_FILE).unlink()
    target = tmp_path / "us-1"

    out = _join(source, target).stdout

    assert f"portal: no {KEY_FILE} in {source}" in out and "copy it here" in out
    assert not (target / KEY_FILE).exists() and not (source / KEY_FILE).exists()


@postgresql_only
def test_join_fills_an_existing_empty_directory(database_url: str, tmp_path: Path) -> None:
    source = _first_node(tmp_path, database_url)
    target = tmp_path / "us-1"
    target.mkdir(mode=0o755)

    _join(source, target)

    assert _mode(target) == 0o700
    assert (target / "ca" / "root.pem").read_bytes() == (source / "ca" / "root.pem").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eu-1", "us-1"]


@postgresql_only
def test_join_refuses_a_node_name_registered_already(database_url: str, tmp_path: Path) -> None:
    source = _first_node(tmp_path, database_url)
    store = SqlStore.open(database_url)
    now = dt.datetime.now(dt.UTC)
    try:
        store.claim_node(
            Node("taken", "us", "https://taken.example", now, now, "1.0"), stale_before=now
        )
    finally:
        store.close()
    joined = run_estkit(
        "server", "init", "--data-dir", tmp_path / "two", "--join", source,
        "--region", "us", "--port", str(free_ports(1)[0]), "--node-name", "taken", check=False,
    )  # fmt: skip
    assert joined.returncode == 78
    assert "a node named 'taken' is registered in the database already" in joined.stderr
    assert not (tmp_path / "two").exists()


# -- one name, one node -----------------------------------------------------------


@postgresql_only
def test_a_copied_data_directory_does_not_start_while_its_node_runs(
    database_url: str, tmp_path: Path
) -> None:
    """A copy of a running node's directory, given its own port and URL but not its own
    name, is refused at start in one line; the running node keeps its registration."""
    source = _first_node(tmp_path, database_url)
    node = EstServer(source, *_ports(source))
    node.start()
    try:
        copy = tmp_path / "copy"
        shutil.copytree(source, copy)
        port, crl_port = free_ports(2)
        set_config(copy, "server", "port", str(port))
        set_config(copy, "server", "public_url", f'"https://localhost:{port}"')
        set_config(copy, "crl", "http_port", str(crl_port))

        started = run_estkit("server", "run", "--data-dir", copy, check=False, timeout=60)

        assert started.returncode == 78, started.stderr
        lines = started.stderr.strip().splitlines()
        assert len(lines) == 1, started.stderr
        assert lines[0].startswith(
            f"estkit: node.name: 'eu-1' is registered by a running node at {node.origin} "
        )
        assert f"not this one's https://localhost:{port}: give this node its own name" in lines[0]
        store = SqlStore.open(database_url)
        try:
            assert [(n.name, n.public_url) for n in store.list_nodes()] == [("eu-1", node.origin)]
        finally:
            store.close()
    finally:
        node.stop()


@postgresql_only
def test_a_node_takes_its_name_over_from_a_stale_registration(
    database_url: str, tmp_path: Path
) -> None:
    source = _first_node(tmp_path, database_url)
    now = dt.datetime.now(dt.UTC)
    gone = now - dt.timedelta(hours=1)
    store = SqlStore.open(database_url)
    try:
        store.claim_node(
            Node("eu-1", "eu", "https://gone.example", gone, gone, "1.0"), stale_before=now
        )
        node = EstServer(source, *_ports(source))
        node.start()
        try:
            (registered,) = store.list_nodes()
        finally:
            node.stop()
    finally:
        store.close()
    assert (registered.name, registered.public_url) == ("eu-1", node.origin)
    assert registered.last_seen > now


@postgresql_only
@pytest.mark.parametrize(
    "crl_url",
    [None, "http://crl.est.example/crl"],
    ids=["ok/the-nodes-own-listener", "ok/a-shared-url"],
)
def test_join_writes_the_crl_url_the_node_issues_with(
    database_url: str, tmp_path: Path, crl_url: str | None
) -> None:
    source = _first_node(tmp_path, database_url)
    target = tmp_path / "us-1"
    port, crl_port = free_ports(2)
    run_estkit(
        "server", "init", "--data-dir", target, "--join", source, "--region", "us",
        "--port", str(port), "--crl-port", str(crl_port), "--node-name", "us-1",
        "--hostname", "us.est.example", *(["--crl-url", crl_url] if crl_url else []),
    )  # fmt: skip
    config = tomllib.loads((target / "estkit.toml").read_text())
    expected = crl_url or f"http://us.est.example:{crl_port}/crl"
    assert config["crl"]["url"] == expected


def test_crl_url_without_join_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = run_estkit(
        "server", "init", "--data-dir", tmp_path / "d", "--crl-url", "http://crl.example/crl",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "--crl-url: only with --join" in proc.stderr
    assert not (tmp_path / "d").exists()
