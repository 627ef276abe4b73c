"""An Azure IoT Hub stand-in: Mosquitto configured the way the hub authenticates devices.

Device listener (TLS, on loopback):
- ``require_certificate true`` and ``use_identity_as_username true``: the client
  certificate's CN is the MQTT user name, as the device id is at the hub;
- the only trust anchor is the operational (devices) issuing CA, stored as an
  OpenSSL "TRUSTED CERTIFICATE" that is explicitly trusted for clientAuth.
  OpenSSL accepts a chain ending at such a certificate without its root
  (IoT Hub with the devices CA uploaded behaves the same), and because the
  root is not trusted, a bootstrap certificate (bootstrap CA → root) is refused
  in the TLS handshake. Mosquitto 2.0.11 has no partial-chain option; trusting
  the root instead would let bootstrap certificates in;
- an ACL binding topics to the CN: a device may publish only under
  ``devices/<CN>/messages/events/`` and read only its own ``devicebound`` topic.

Observer listener (plain MQTT, loopback only, anonymous): reads every topic
and may send cloud-to-device messages, so tests assert on what the "hub"
received rather than on what a publisher was told (Mosquitto acknowledges a
publish its ACL drops).

The broker's own certificate is issued under the estkit root (SAN localhost,
127.0.0.1, ::1), so devices verify it with the same trust anchor as EST.
Waiting loops are bounded in count and time.
"""

from __future__ import annotations

import base64
import datetime as dt
import getpass
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from estkit.pki import keys
from estkit.pki.profiles import Kind, Profile, issue_leaf

MOSQUITTO = "mosquitto"
# X509_CERT_AUX with trust = { id-kp-clientAuth }: appended to a certificate's DER it
# makes the PEM "TRUSTED CERTIFICATE" that `openssl x509 -addtrust clientAuth -trustout` writes.
_CLIENT_AUTH_TRUST = bytes.fromhex("300c300a06082b06010505070302")

DEVICE_ACL = """\
# Devices: user name = certificate CN (use_identity_as_username).
pattern write devices/%u/messages/events/#
pattern read devices/%u/messages/devicebound/#
pattern write $iothub/twin/PATCH/properties/reported/#
pattern write $iothub/twin/GET/#
pattern read $iothub/twin/res/#
"""

OBSERVER_ACL = """\
# The loopback observer (anonymous): reads everything, may send cloud-to-device messages.
topic read #
topic read $iothub/#
topic write devices/+/messages/devicebound/#
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def trusted_for_client_auth(cert: x509.Certificate) -> bytes:
    """``cert`` as an OpenSSL TRUSTED CERTIFICATE PEM, explicitly trusted for clientAuth."""
    der = cert.public_bytes(Encoding.DER) + _CLIENT_AUTH_TRUST
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return (
        "-----BEGIN TRUSTED CERTIFICATE-----\n"
        + "\n".join(lines)
        + "\n-----END TRUSTED CERTIFICATE-----\n"
    ).encode("ascii")


def issue_broker_certificate(
    ca_dir: Path, out: Path, *, names: tuple[str, ...] = ("localhost",)
) -> tuple[Path, Path]:
    """A TLS server certificate for the broker, signed by the estkit root in ``ca_dir``."""
    root = x509.load_pem_x509_certificate((ca_dir / "root.pem").read_bytes())
    root_key = keys.load_private_key_pem((ca_dir / "root.key").read_bytes())
    key = keys.generate_key("ec-p256")
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    sans += [x509.IPAddress(ip_address("127.0.0.1")), x509.IPAddress(ip_address("::1"))]
    cert = issue_leaf(
        profile=Profile("hub-standin", Kind.TLS_SERVER, dt.timedelta(days=2)),
        public_key=key.public_key(),
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
        sans=x509.SubjectAlternativeName(sans),
        issuer=root,
        issuer_key=root_key,
        now=dt.datetime.now(dt.UTC),
    )
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "broker.pem", out / "broker.key"
    cert_path.write_bytes(cert.public_bytes(Encoding.PEM))
    key_path.write_bytes(keys.key_to_pem(key))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class HubStandIn:
    """A Mosquitto process: TLS device listener on ``port``, observer on ``observer_port``."""

    directory: Path
    port: int
    observer_port: int
    ca_file: Path  # what devices verify the broker with (the estkit root)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.directory / "mosquitto.log"

    def start(self) -> None:
        assert self.proc is None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [MOSQUITTO, "-c", str(self.directory / "mosquitto.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited {self.proc.returncode}: {self.log()}")
            if all(_accepts(p) for p in (self.port, self.observer_port)):
                return
            time.sleep(0.05)
        raise AssertionError(f"mosquitto did not listen within 15 s: {self.log()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def observer(self) -> Observer:
        return Observer.connect(self.observer_port)


def make_hub_standin(
    directory: Path,
    *,
    server_data_dir: Path,
    port: int | None = None,
    verified_cas: tuple[str, ...] = ("devices",),
) -> HubStandIn:
    """Write the broker's certificate, trust anchor, ACLs and config (not started).
    ``verified_cas``: the server's CAs uploaded and verified at the hub (IoT Hub accepts
    a device whose chain reaches one of them)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_dir = server_data_dir / "ca"
    cert_path, key_path = issue_broker_certificate(ca_dir, directory)
    anchor = directory / "devices-ca-trusted.pem"
    anchor.write_bytes(
        b"".join(
            trusted_for_client_auth(
                x509.load_pem_x509_certificate((ca_dir / f"{name}.pem").read_bytes())
            )
            for name in verified_cas
        )
    )
    (directory / "devices.acl").write_text(DEVICE_ACL)
    (directory / "observer.acl").write_text(OBSERVER_ACL)
    device_port = port if port is not None else free_port()
    observer_port = free_port()
    config = f"""\
# Azure IoT Hub stand-in (see tests/hubstandin.py)
per_listener_settings true
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
# Running as root, mosquitto would switch to the "mosquitto" user and lose
# access to these private files.
user {getpass.getuser()}

listener {device_port} 127.0.0.1
cafile {anchor}
certfile {cert_path}
keyfile {key_path}
require_certificate true
use_identity_as_username true
acl_file {directory / "devices.acl"}

listener {observer_port} 127.0.0.1
allow_anonymous true
acl_file {directory / "observer.acl"}
"""
    (directory / "mosquitto.conf").write_text(config)
    return HubStandIn(
        directory=directory,
        port=device_port,
        observer_port=observer_port,
        ca_file=ca_dir / "root.pem",
    )


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    at: float

    @property
    def device_id(self) -> str | None:
        parts = self.topic.split("/")
        return parts[1] if len(parts) > 1 and parts[0] == "devices" else None

    @property
    def properties(self) -> dict[str, str]:
        """The URL-encoded property bag after ``messages/events/``."""
        _, _, bag = self.topic.partition("/messages/events/")
        pairs = (p.partition("=") for p in bag.split("&") if p)
        return {unquote(k): unquote(v) for k, _, v in pairs}

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Observer:
    """A plain MQTT client on the observer listener, recording every message."""

    client: mqtt.Client
    messages: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    @classmethod
    def connect(cls, port: int) -> Observer:
        client = mqtt.Client(client_id=f"observer-{os.getpid()}-{free_port()}")
        observer = cls(client)
        subscribed = threading.Event()

        def on_connect(c: mqtt.Client, userdata: Any, flags: Any, rc: int) -> None:
            c.subscribe([("#", 1), ("$iothub/#", 1)])

        def on_subscribe(c: mqtt.Client, userdata: Any, mid: int, granted: Any) -> None:
            subscribed.set()

        def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            with observer._cond:
                observer.messages.append(Received(msg.topic, bytes(msg.payload), time.time()))
                observer._cond.notify_all()

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.connect("127.0.0.1", port, keepalive=30)
        client.loop_start()
        if not subscribed.wait(10):
            observer.close()
            raise AssertionError("observer could not subscribe within 10 s")
        return observer

    def wait_for(
        self, predicate: Callable[[Received], bool], *, timeout: float, count: int = 1
    ) -> list[Received]:
        """The first ``count`` messages matching ``predicate``, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if predicate(m)]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = sorted({m.topic for m in self.messages})[:20]
                    raise AssertionError(
                        f"only {len(found)} of {count} expected messages within {timeout:g} s; "
                        f"topics seen: {topics}"
                    )
                self._cond.wait(remaining)

    def matching(self, predicate: Callable[[Received], bool]) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if predicate(m)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
