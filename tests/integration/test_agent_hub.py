"""The IoT Hub stand-in authenticates like the hub, and the official Azure IoT device SDK
accepts the files the agent writes."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agentutil import AgentProcess, AgentSetup, setup_agent, wait_until
from backends import server_database
from estserver import EstServer, make_server
from hubstandin import HubStandIn, make_hub_standin

# azure-iot-device connects to the gateway on this port; it cannot be changed.
SDK_PORT = 8883


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, backend: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EstServer]:
    est = make_server(
        tmp_path_factory.mktemp("est-hub"),
        config={("profiles.operational", "validity"): '"300s"'},
        database_url=server_database(request, backend),
    )
    est.start()
    try:
        yield est
    finally:
        est.stop()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, server: EstServer) -> Iterator[HubStandIn]:
    standin = make_hub_standin(tmp_path_factory.mktemp("hub"), server_data_dir=server.data_dir)
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


@pytest.fixture
def enrolled(server: EstServer, hub: HubStandIn, device_id: str, tmp_path: Path) -> AgentSetup:
    setup = setup_agent(server, device_id, tmp_path / "dev", hub=hub)
    setup.renew()
    return setup


class Session:
    """A paho client with a client certificate: connect, publish, report how it went."""

    def __init__(self, hub: HubStandIn, client_id: str, certfile: Path, keyfile: Path) -> None:
        context = ssl.create_default_context(cafile=str(hub.ca_file))
        context.load_cert_chain(str(certfile), str(keyfile))
        self.client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311)
        self.client.username_pw_set(
            f"standin.azure-devices.net/{client_id}/?api-version=2021-04-12"
        )
        self.client.tls_set_context(context)
        self.connack: int | None = None
        self.error: str | None = None
        self._done = threading.Event()

        def on_connect(c: mqtt.Client, userdata: object, flags: object, rc: int) -> None:
            self.connack = rc
            self._done.set()

        def on_disconnect(c: mqtt.Client, userdata: object, rc: int) -> None:
            self.error = self.error or f"disconnected: {mqtt.error_string(rc)}"
            self._done.set()

        self.client.on_connect = on_connect
        self.client.on_disconnect = on_disconnect
        try:
            self.client.connect("localhost", hub.port, keepalive=30)
        except OSError as exc:  # TLS 1.2: the refusal ends the handshake
            self.error = f"handshake: {exc}"
            return
        for _ in range(50):
            try:
                rc = self.client.loop(timeout=0.2)
            except OSError as exc:  # TLS 1.3: the refusal arrives as an alert after it
                self.error = f"after handshake: {exc}"
                break
            if self._done.is_set() or rc != mqtt.MQTT_ERR_SUCCESS:
                break

    @property
    def accepted(self) -> bool:
        return self.connack == 0 and self.error is None

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        for _ in range(50):
            if info.is_published():
                return
            self.client.loop(timeout=0.2)
        raise AssertionError(f"no PUBACK for {topic}")

    def close(self) -> None:
        if self.error is None:
            self.client.disconnect()
            self.client.loop(timeout=0.2)
        self.client._reset_sockets()  # paho 1.6 keeps its socket pair otherwise


def test_hub_standin_refuses_bootstrap_certificates_and_binds_topics_to_the_cn(
    hub: HubStandIn, enrolled: AgentSetup, tmp_path: Path
) -> None:
    device_id = enrolled.device_id
    boot = enrolled.directory / "bootstrap"
    boot_full = tmp_path / "bootstrap-fullchain.pem"
    boot_full.write_bytes((boot / "cert.pem").read_bytes() + (boot / "chain.pem").read_bytes())
    observer = hub.observer()
    try:
        refused = Session(hub, device_id, boot_full, boot / "key.pem")
        refused.close()
        assert not refused.accepted, "a bootstrap certificate must not reach the hub"
        # Mosquitto may log the refusal just after the client has seen the TLS alert.
        wait_until(
            lambda: "certificate verify failed" in hub.log(),
            timeout=10,
            what="Mosquitto logs the refused bootstrap certificate",
        )

        current = enrolled.state_dir / "current"
        session = Session(hub, device_id, current / "fullchain.pem", current / "key.pem")
        try:
            assert session.accepted, session.error or session.connack
            # The ACL drops (but acknowledges) a publish under another device's id.
            session.publish("devices/someone-else/messages/events/", b"spoofed")
            session.publish(f"devices/{device_id}/messages/events/", b"genuine")
        finally:
            session.close()
        observer.wait_for(lambda m: m.payload == b"genuine", timeout=10)
        assert observer.matching(lambda m: m.payload == b"spoofed") == []
        assert observer.matching(lambda m: m.device_id == device_id)[0].payload == b"genuine"
    finally:
        observer.close()


@pytest.fixture
def sdk_hub(server: EstServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubStandIn]:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", SDK_PORT))
        except OSError as exc:
            pytest.fail(
                f"port {SDK_PORT} on 127.0.0.1 is in use ({exc.strerror}); the Azure IoT SDK "
                "connects only there: stop whatever listens on it (a system mosquitto?)"
            )
    standin = make_hub_standin(
        tmp_path_factory.mktemp("hub-8883"), server_data_dir=server.data_dir, port=SDK_PORT
    )
    standin.start()
    try:
        yield standin
    finally:
        standin.stop()


# The SDK's own code asks for TLS 1.2 by a constant Python deprecates; that is its business.
@pytest.mark.filterwarnings("ignore:ssl.PROTOCOL_TLSv1_2 is deprecated:DeprecationWarning")
def test_official_azure_iot_device_sdk_connects_with_the_agents_files(
    server: EstServer, sdk_hub: HubStandIn, enrolled: AgentSetup
) -> None:
    from azure.iot.device import X509, IoTHubDeviceClient, Message

    device_id = enrolled.device_id
    current = enrolled.state_dir / "current"
    observer = sdk_hub.observer()
    client = IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(cert_file=str(current / "fullchain.pem"), key_file=str(current / "key.pem")),
        hostname="standin.azure-devices.net",
        device_id=device_id,
        gateway_hostname="localhost",
        server_verification_cert=server.root_pem.read_text(),
        connection_retry=False,
    )
    try:
        client.connect()
        message = Message(json.dumps({"from": "azure-iot-device", "device": device_id}))
        message.content_type = "application/json"
        message.content_encoding = "utf-8"
        client.send_message(message)
    finally:
        client.shutdown()
    try:
        received = observer.wait_for(
            lambda m: m.device_id == device_id and b"azure-iot-device" in m.payload, timeout=15
        )[0]
    finally:
        observer.close()
    assert received.topic.startswith(f"devices/{device_id}/messages/events/")
    assert received.properties.get("$.ct") == "application/json"
    assert f"as {device_id} " in sdk_hub.log()  # user name = certificate CN


def test_telemetry_queued_while_the_hub_is_down_is_delivered_after_reconnecting(
    server: EstServer, device_id: str, tmp_path: Path
) -> None:
    standin = make_hub_standin(tmp_path / "hub", server_data_dir=server.data_dir)
    standin.start()
    setup = setup_agent(server, device_id, tmp_path / "dev", hub=standin, telemetry_interval="0.3s")
    agent = AgentProcess(setup).start()
    before = standin.observer()
    assert agent.proc is not None
    try:
        before.wait_for(lambda m: m.device_id == device_id, timeout=20)
        # Held still while the hub goes away, so that nothing it acknowledged is unseen.
        agent.proc.send_signal(signal.SIGSTOP)
        time.sleep(0.5)
        last_before = max(m.json()["seq"] for m in before.messages if m.device_id == device_id)
        before.close()
        standin.stop()
        agent.proc.send_signal(signal.SIGCONT)
        wait_until(
            lambda: not (setup.status().get("hub") or {}).get("connected"),
            timeout=10,
            what="the agent to notice the hub is gone",
        )
        time.sleep(1.5)  # heartbeats queue up meanwhile
        # Held still while the hub comes back and the observer subscribes, so it misses nothing.
        agent.proc.send_signal(signal.SIGSTOP)
        try:
            standin.start()
            after = standin.observer()
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        try:
            wait_until(
                lambda: (setup.status().get("hub") or {}).get("connected"),
                timeout=15,
                what=f"reconnection:\n{agent.log()}",
            )
            # Everything queued during the outage arrives, in order, then the new ones.
            tail = after.wait_for(lambda m: m.device_id == device_id, timeout=15, count=8)
        finally:
            after.close()
    finally:
        assert agent.stop() == 0
        standin.stop()
    seqs = [m.json()["seq"] for m in tail]
    assert seqs[0] <= last_before + 1, (last_before, seqs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    assert seqs[-1] - last_before >= 4  # at least the ~5 heartbeats made during the outage
