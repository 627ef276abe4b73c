"""The IoT Hub connection: Azure IoT Hub's device MQTT protocol over paho-mqtt.

TLS to ``host:port`` presenting the current version's ``fullchain.pem``
(certificate + issuing CA), MQTT 3.1.1, client id = device id, user name
``{hub_name}/{device_id}/?api-version=…``, no password.

- telemetry: ``devices/{id}/messages/events/{properties}``, JSON, QoS 1;
  the properties say the content type and ``certSerial`` (the certificate
  of the connection that carried the message);
- cloud-to-device: subscribed at ``devices/{id}/messages/devicebound/#``;
- reported properties: ``$iothub/twin/PATCH/properties/reported/?$rid=N``
  with the certificate's serial and validity, after every connect.

One thread owns the paho client (paho is not thread-safe), drives its
network loop, sends a heartbeat every ``telemetry_interval`` and reconnects
with backoff. ``use(version)`` after a swap makes it disconnect and connect
again with the new files. Telemetry waits in a bounded in-memory queue and
leaves it only when the broker acknowledges it (PUBACK), so messages queued
while disconnected, or in flight during a swap, are sent again on the next
connection: at least once, never silently dropped (unless the queue overflows).
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import paho.mqtt.client as mqtt

from estkit import __version__
from estkit.agent.config import HubSettings
from estkit.agent.renewal import retry_delay
from estkit.agent.state import Version
from estkit.agent.status import StatusFile, iso

log = logging.getLogger(__name__)

QUEUE_LIMIT = 1000
LOOP_TIMEOUT = 0.2
RECONNECT_MIN = 1.0


@dataclass(slots=True)
class _Message:
    payload: bytes
    mid: int | None = None  # set while published and not yet acknowledged


def telemetry_topic(device_id: str, properties: dict[str, str]) -> str:
    """IoT Hub's device-to-cloud topic, with URL-encoded message properties."""
    bag = "&".join(f"{quote(k, safe='$.')}={quote(v, safe='')}" for k, v in properties.items())
    return f"devices/{device_id}/messages/events/{bag}"


def reported_properties(version: Version) -> dict[str, Any]:
    """What the device reports about its certificate (device twin, reported properties)."""
    return {
        "estkit": {
            "agent": __version__,
            "certificate": {
                "serial": version.serial,
                "version": version.number,
                "notBefore": iso(version.not_before),
                "notAfter": iso(version.not_after),
            },
        }
    }


class HubConnection:
    """Keeps one MQTT connection to the hub alive with the current certificate."""

    def __init__(
        self,
        settings: HubSettings,
        *,
        device_id: str,
        status: StatusFile | None = None,
        on_connected: Callable[[Version], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._settings = settings
        self._device_id = device_id
        self._status = status
        self._on_connected_cb = on_connected
        self._rng = rng or random.Random()
        # Re-entrant: paho may run a callback (which takes it) inside publish().
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._queue: collections.deque[_Message] = collections.deque()
        self._wanted: Version | None = None
        self._thread: threading.Thread | None = None
        self._connected_version: Version | None = None
        self._connected = False
        self._seq = 0
        self._rid = 0
        self._sent = 0
        self._dropped = 0
        self._started = time.monotonic()

    # -- API for other threads ---------------------------------------------------------

    def start(self, version: Version | None) -> None:
        with self._lock:
            self._wanted = version
        self._thread = threading.Thread(target=self._run, name="estkit-hub", daemon=True)
        self._thread.start()

    def use(self, version: Version) -> None:
        """Connect with ``version`` from now on (reconnecting if connected with another)."""
        with self._lock:
            self._wanted = version
        self._wake.set()

    def send(self, body: dict[str, Any]) -> None:
        """Queue a telemetry message (JSON) until the hub has acknowledged it."""
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        with self._lock:
            if len(self._queue) >= QUEUE_LIMIT:
                self._queue.popleft()
                self._dropped += 1
                log.warning("telemetry queue full: dropped the oldest message")
            self._queue.append(_Message(payload))
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # -- the hub thread ----------------------------------------------------------------

    def _run(self) -> None:
        client: Any = None
        failures = 0
        next_connect = 0.0
        next_heartbeat = time.monotonic()
        interval = self._settings.telemetry_interval
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                with self._lock:
                    wanted = self._wanted
                if client is not None and not _same(wanted, self._connected_version):
                    self._close(client, "certificate swapped: reconnecting with the new one")
                    client = None
                    next_connect = now
                if client is None and wanted is not None and now >= next_connect:
                    try:
                        client = self._open(wanted)
                    except (OSError, ValueError) as exc:
                        failures += 1
                        next_connect = now + self._backoff(failures)
                        self._failed(f"cannot connect to {self._where()}: {_describe(exc)}")
                if client is not None:
                    error = self._loop(client)
                    if error is not None:
                        self._lost(client)
                        client = None
                        failures += 1
                        next_connect = time.monotonic() + self._backoff(failures)
                        self._failed(error)
                    elif self._connected:
                        failures = 0
                        self._flush(client)
                else:
                    self._wake.wait(LOOP_TIMEOUT)
                    self._wake.clear()
                if now >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = now + interval
        finally:
            if client is not None:
                self._close(client, "agent stopping")

    def _open(self, version: Version) -> Any:
        context = ssl.create_default_context(
            cafile=str(self._settings.ca_file) if self._settings.ca_file else None
        )
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(version.fullchain_path), str(version.key_path))
        client = mqtt.Client(client_id=self._device_id, clean_session=False, protocol=mqtt.MQTTv311)
        client.username_pw_set(self._settings.username(self._device_id), None)
        client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        log.info(
            "connecting to the hub %s with certificate %s (version %d)",
            self._where(),
            version.serial,
            version.number,
        )
        try:
            client.connect(self._settings.host, self._settings.port, self._settings.keepalive)
        except BaseException:
            getattr(client, "_reset_sockets", lambda: None)()
            raise
        self._connected_version = version
        return client

    def _loop(self, client: Any) -> str | None:
        """One turn of paho's network loop; the reason when the connection is gone."""
        try:
            rc = client.loop(timeout=LOOP_TIMEOUT)
        except OSError as exc:  # a TLS alert (client certificate refused) surfaces here
            return f"connection to {self._where()} failed: {_describe(exc)}"
        if rc == mqtt.MQTT_ERR_SUCCESS and client.socket() is not None:
            return None
        return f"connection to {self._where()} lost: {mqtt.error_string(rc)}"

    def _close(self, client: Any, why: str) -> None:
        log.info("disconnecting from the hub: %s", why)
        try:
            client.disconnect()
            for _ in range(10):
                if client.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS or client.socket() is None:
                    break
        except OSError:
            pass
        self._lost(client)

    def _lost(self, client: Any) -> None:
        with self._lock:
            for message in self._queue:
                message.mid = None  # not acknowledged: send again on the next connection
        was_connected = self._connected
        self._connected = False
        self._connected_version = None
        # paho 1.6 keeps the socket and its wake-up socket pair until this private call;
        # a client object is never reused, so close them now rather than at GC.
        reset = getattr(client, "_reset_sockets", None)
        if reset is not None:
            with contextlib.suppress(OSError):
                reset()
        if was_connected and self._status is not None:
            self._status.update_hub(connected=False, disconnected_at=iso(_now()))

    def _failed(self, message: str) -> None:
        log.warning("%s", message)
        if self._status is not None:
            self._status.update_hub(
                connected=False, last_error=message, last_error_at=iso(_now()), queued=self.queued
            )

    def _backoff(self, failures: int) -> float:
        return retry_delay(
            failures,
            minimum=min(RECONNECT_MIN, self._settings.reconnect_max),
            maximum=self._settings.reconnect_max,
            rng=self._rng,
        )

    def _flush(self, client: Any) -> None:
        version = self._connected_version
        if version is None:
            return
        topic = telemetry_topic(
            self._device_id,
            {"$.ct": "application/json", "$.ce": "utf-8", "certSerial": version.serial},
        )
        with self._lock:
            for message in self._queue:
                if message.mid is not None:
                    continue
                info = client.publish(topic, message.payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break
                message.mid = info.mid

    def _heartbeat(self) -> None:
        self._seq += 1
        self.send(
            {
                "deviceId": self._device_id,
                "seq": self._seq,
                "time": iso(_now()),
                "uptime": round(time.monotonic() - self._started, 1),
            }
        )

    def _where(self) -> str:
        return f"{self._settings.host}:{self._settings.port}"

    # -- paho callbacks (run inside client.loop, on the hub thread) --------------------

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: int) -> None:
        version = self._connected_version
        if rc != 0 or version is None:
            self._failed(f"hub refused the connection: {mqtt.connack_string(rc)}")
            client.disconnect()
            return
        self._connected = True
        log.info("connected to the hub as %s with certificate %s", self._device_id, version.serial)
        client.subscribe(f"devices/{self._device_id}/messages/devicebound/#", qos=1)
        client.subscribe("$iothub/twin/res/#", qos=0)
        self._rid += 1
        client.publish(
            f"$iothub/twin/PATCH/properties/reported/?$rid={self._rid}",
            json.dumps(reported_properties(version)),
            qos=1,
        )
        if self._status is not None:
            self._status.update_hub(
                connected=True,
                connected_at=iso(_now()),
                serial=version.serial,
                version=version.number,
                last_error=None,
                queued=self.queued,
            )
        if self._on_connected_cb is not None:
            self._on_connected_cb(version)

    def _on_publish(self, client: Any, userdata: Any, mid: int) -> None:
        with self._lock:
            for message in self._queue:
                if message.mid == mid:
                    self._queue.remove(message)
                    self._sent += 1
                    break

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        topic = str(message.topic)
        if topic.startswith(f"devices/{self._device_id}/messages/devicebound/"):
            log.info("cloud-to-device message on %s (%d bytes)", topic, len(message.payload))
        else:
            log.debug("hub message on %s (%d bytes)", topic, len(message.payload))


def _same(a: Version | None, b: Version | None) -> bool:
    return a is not None and b is not None and a.number == b.number


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"hub certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
