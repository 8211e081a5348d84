"""TLS on https.listen and mqtts.listen, and mutual TLS.

Certificates come from tls_certs.make_pki, made with the openssl command
for each test module. Clients are the real tools: curl, python requests
and ssl, websockets, mosquitto_pub and paho.
"""

import asyncio
import json
import random
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time

import paho.mqtt.client as paho
import pytest
import requests
import websockets

import tls_certs
from conftest import (add_device, binary, free_port, run_cli, stop,
                      wait_ready, write_config)

TIMEOUT_S = 10


class TLSServer:
    """A running ingestd with TLS listeners, and its folders."""

    def __init__(self, folder, proc, config, log, ports, keys):
        self.folder = folder
        self.proc = proc
        self.config = config
        self.log = log
        self.port, self.admin_port, self.mqtt_port = ports[:3]
        self.https_port, self.mqtts_port = ports[3:]
        self.keys = keys
        self.data_dir = folder / "data"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.https_url = f"https://127.0.0.1:{self.https_port}"

    def metric(self, name, labels):
        """Return the value of the series `name{labels}`, or 0."""
        text = requests.get(self.admin_url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_log(self, text, timeout_s=TIMEOUT_S):
        """Wait until the log contains `text`; return the log."""
        deadline = time.monotonic() + timeout_s
        while True:
            log = self.log.read_text()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{text!r} not in the log:\n{log[-3000:]}")
            time.sleep(0.05)

    def records(self):
        """Return every envelope the file sink wrote so far."""
        out = []
        for path in sorted((self.data_dir / "out").glob("*.ndjson")):
            out += [json.loads(line)
                    for line in path.read_text().splitlines() if line]
        return out

    def wait_for_ids(self, ids, timeout_s=TIMEOUT_S):
        """Wait until the sink wrote every message id in `ids`."""
        deadline = time.monotonic() + timeout_s
        while True:
            seen = {r["message_id"] for r in self.records()}
            if set(ids) <= seen:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"ids missing: {set(ids) - seen}")
            time.sleep(0.1)


def tls_lines(pki, tls, folder):
    """Return the config lines of the TLS sections.

    The server certificate and key are copied into `folder`, so that a
    test can replace them before a reload.
    """
    cert = folder / "server.crt"
    key = folder / "server.key"
    shutil.copy(pki["server"][0], cert)
    shutil.copy(pki["server"][1], key)
    settings = {"cert_file": cert, "key_file": key, "ca_file": pki["ca"],
                "crl_file": pki["crl"], **tls}
    lines = ["tls:"]
    lines += [f"  {k}: {v}" for k, v in settings.items()]
    return lines


def start_tls_server(folder, pki, tls=None, devices=("dev-1", "dev-2"),
                     disabled=("dev-off",), http=None):
    """Start ingestd with https and mqtts listeners and mutual TLS."""
    folder.mkdir(parents=True, exist_ok=True)
    ports = [free_port() for _ in range(5)]
    config = write_config(folder, ports[0], ports[1], http=http,
                          mqtt_port=ports[2])
    lines = config.read_text().splitlines()
    lines += ["https:", f"  listen: 127.0.0.1:{ports[3]}",
              "mqtts:", f"  listen: 127.0.0.1:{ports[4]}"]
    lines += tls_lines(pki, tls or {"client_auth": "optional"}, folder)
    config.write_text("\n".join(lines) + "\n")
    keys = {d: add_device(d, config) for d in (*devices, *disabled)}
    for d in disabled:
        run_cli("device", "disable", d, config=config)
    log = folder / "ingestd.log"
    with open(log, "ab") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = TLSServer(folder, proc, config, log, ports, keys)
    try:
        wait_ready(proc, server.admin_url, log)
    except BaseException:
        stop(server)
        raise
    return server


def finish(server):
    code = stop(server)
    assert code == 0, (
        f"ingestd exited with {code}; its log:\n"
        f"{server.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tls_certs.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def server(tmp_path_factory, pki):
    """A server with tls.client_auth optional and the CRL."""
    s = start_tls_server(tmp_path_factory.mktemp("tls"), pki)
    yield s
    finish(s)


def client_context(pki, cert=None, alpn=None):
    """Return an ssl context trusting the test CA, with a client cert."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert is not None:
        ctx.load_cert_chain(str(pki[cert][0]), str(pki[cert][1]))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def reading(device_id="dev-1", value=5):
    return {"device_id": device_id, "sensor_value": value}


def curl(server, pki, *args):
    """POST one reading with curl over HTTPS; return (status, body)."""
    cmd = ["curl", "-sS", "--cacert", str(pki["ca"]), "-o", "-", "-w",
           "\n%{http_code}", "-H", "Content-Type: application/json",
           "--data", json.dumps(reading()), *args,
           server.https_url + "/v1/data"]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    body, _, status = proc.stdout.rpartition("\n")
    return int(status or 0), body


# ---- HTTPS ----


def test_curl_https_with_api_key(server, pki):
    status, body = curl(server, pki, "-H",
                        f"Authorization: Bearer {server.keys['dev-1']}")
    assert status == 202, body
    server.wait_for_ids(json.loads(body)["ids"])


def test_curl_https_client_cert_without_key(server, pki):
    status, body = curl(server, pki, "--cert", str(pki["valid"][0]),
                        "--key", str(pki["valid"][1]))
    assert status == 202, body
    ids = json.loads(body)["ids"]
    server.wait_for_ids(ids)
    record = [r for r in server.records() if r["message_id"] == ids[0]][0]
    assert record["device_id"] == "dev-1"


def test_https_without_credentials_is_401(server, pki):
    status, body = curl(server, pki)
    assert status == 401, body


def test_requests_client_cert(server, pki):
    r = requests.post(server.https_url + "/v1/data", json=reading(),
                      verify=str(pki["ca"]), cert=tuple(map(str, pki["valid"])),
                      timeout=TIMEOUT_S)
    assert r.status_code == 202, r.text


def test_cert_with_matching_key(server, pki):
    r = requests.post(server.https_url + "/v1/data", json=reading(),
                      verify=str(pki["ca"]), cert=tuple(map(str, pki["valid"])),
                      headers={"X-API-Key": server.keys["dev-1"]},
                      timeout=TIMEOUT_S)
    assert r.status_code == 202, r.text


def test_cert_with_other_devices_key_is_403(server, pki):
    r = requests.post(server.https_url + "/v1/data", json=reading("dev-2"),
                      verify=str(pki["ca"]), cert=tuple(map(str, pki["valid"])),
                      headers={"Authorization":
                               f"Bearer {server.keys['dev-2']}"},
                      timeout=TIMEOUT_S)
    assert r.status_code == 403, r.text
    assert r.json()["error"] == "credential_mismatch"
    assert "credential does not match client certificate" in \
        r.json()["message"]


def test_cert_device_cannot_send_for_another(server, pki):
    r = requests.post(server.https_url + "/v1/data", json=reading("dev-2"),
                      verify=str(pki["ca"]), cert=tuple(map(str, pki["valid"])),
                      timeout=TIMEOUT_S)
    assert r.status_code == 403, r.text


def test_https_alpn_selects_http11(server, pki):
    ctx = client_context(pki, alpn=["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.https_port),
                                  timeout=TIMEOUT_S) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "http/1.1"
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_tls12_rejects_cbc_cipher(server, pki):
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    with socket.create_connection(("127.0.0.1", server.https_port),
                                  timeout=TIMEOUT_S) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_tls12_gcm_cipher_works(server, pki):
    ctx = client_context(pki)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with socket.create_connection(("127.0.0.1", server.https_port),
                                  timeout=TIMEOUT_S) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"


def test_handshake_timeout_closes(server, pki):
    before = server.metric("ingestd_tls_handshakes_total",
                           'listener="https",result="timeout"')
    with socket.create_connection(("127.0.0.1", server.https_port),
                                  timeout=TIMEOUT_S) as raw:
        # http.header_timeout is 1s in the test config.
        assert raw.recv(1) == b""
    after = server.metric("ingestd_tls_handshakes_total",
                          'listener="https",result="timeout"')
    assert after == before + 1


# ---- Rejected client certificates ----


REJECTIONS = [
    ("expired", "expired", "certificate has expired"),
    ("not_yet_valid", "not_yet_valid", "certificate is not yet valid"),
    ("revoked", "revoked", "certificate revoked"),
    ("wrong_ca", "unknown_ca", "unable to get local issuer certificate"),
    ("unknown", "unknown_device", "device dev-unknown"),
    ("disabled", "disabled", "device dev-off"),
]


def handshake_fails(port, ctx):
    """Return True if the TLS connection fails, during the handshake or,
    with TLS 1.3, at the first read after it."""
    with socket.create_connection(("127.0.0.1", port),
                                  timeout=TIMEOUT_S) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /v1/data HTTP/1.1\r\nHost: x\r\n\r\n")
                return tls.recv(100) == b""
        except (ssl.SSLError, ConnectionResetError):
            return True


@pytest.mark.parametrize("cert,reason,detail", REJECTIONS)
def test_rejected_certificate(server, pki, cert, reason, detail):
    metric = ("ingestd_tls_client_cert_failures_total", f'reason="{reason}"')
    before = server.metric(*metric)
    assert handshake_fails(server.https_port, client_context(pki, cert))
    log = server.wait_log(f"reason={reason} ")
    line = [x for x in log.splitlines() if f"reason={reason} " in x][-1]
    assert "tls handshake failed" in line
    assert detail in line
    assert server.metric(*metric) == before + 1


def test_rejected_certificate_over_mqtts(server, pki):
    before = server.metric("ingestd_tls_handshakes_total",
                           'listener="mqtts",result="client_cert_rejected"')
    proc = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.mqtts_port),
         "--cafile", str(pki["ca"]), "--cert", str(pki["expired"][0]),
         "--key", str(pki["expired"][1]), "-t", "devices/dev-1/data",
         "-m", json.dumps(reading()), "-q", "1"],
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode != 0
    assert server.metric(
        "ingestd_tls_handshakes_total",
        'listener="mqtts",result="client_cert_rejected"') == before + 1


def test_curl_rejected_certificate_fails(server, pki):
    status, _ = curl(server, pki, "--cert", str(pki["revoked"][0]),
                     "--key", str(pki["revoked"][1]))
    assert status == 0


# ---- WebSocket over TLS ----


def ws_send_one(server, pki, cert=None, key=None, value=5,
                device_id="dev-1"):
    """Send one reading over wss:// and return the reply."""
    headers = {"X-API-Key": key} if key else {}

    async def exchange():
        async with websockets.connect(
                f"wss://127.0.0.1:{server.https_port}/v1/ws",
                ssl=client_context(pki, cert), extra_headers=headers,
                open_timeout=TIMEOUT_S, ping_interval=None) as ws:
            await ws.send(json.dumps({"id": "m1",
                                      "reading": reading(device_id, value)}))
            return json.loads(await ws.recv())

    return asyncio.run(asyncio.wait_for(exchange(), TIMEOUT_S))


def test_wss_with_client_cert(server, pki):
    reply = ws_send_one(server, pki, cert="valid", value=30)
    assert reply["type"] == "ack", reply
    server.wait_for_ids(reply["ids"])


def test_wss_with_key_header(server, pki):
    reply = ws_send_one(server, pki, key=server.keys["dev-2"],
                        device_id="dev-2", value=31)
    assert reply["type"] == "ack", reply


def test_wss_cert_with_other_devices_key_is_403(server, pki):
    with pytest.raises(websockets.exceptions.InvalidStatusCode) as info:
        ws_send_one(server, pki, cert="valid", key=server.keys["dev-2"])
    assert info.value.status_code == 403


def test_wss_cert_cannot_send_for_another(server, pki):
    reply = ws_send_one(server, pki, cert="valid", device_id="dev-2")
    assert reply["type"] == "error", reply
    assert reply["error"] == "device_mismatch"


# ---- MQTTS ----


def mosquitto_pub(server, pki, *args):
    proc = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(server.mqtts_port),
         "--cafile", str(pki["ca"]), "-q", "1", "-V", "mqttv311", *args],
        capture_output=True, text=True, timeout=TIMEOUT_S)
    return proc.returncode, proc.stderr


def wait_for_value(server, value, device_id="dev-1"):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        for r in server.records():
            payload = r.get("payload")
            if (r["device_id"] == device_id and isinstance(payload, dict)
                    and payload.get("sensor_value") == value):
                return r
        time.sleep(0.1)
    raise AssertionError(f"no reading {value} from {device_id} in output")


def test_mosquitto_pub_client_cert(server, pki):
    code, err = mosquitto_pub(
        server, pki, "--cert", str(pki["valid"][0]), "--key",
        str(pki["valid"][1]), "-t", "devices/dev-1/data", "-m",
        json.dumps(reading(value=41)))
    assert code == 0, err
    record = wait_for_value(server, 41)
    assert record["protocol"] == "mqtt"


def test_mosquitto_pub_password_over_tls(server, pki):
    code, err = mosquitto_pub(
        server, pki, "-u", "dev-2", "-P", server.keys["dev-2"], "-t",
        "devices/dev-2/data", "-m", json.dumps(reading("dev-2", 42)))
    assert code == 0, err
    wait_for_value(server, 42, "dev-2")


def test_mqtts_cert_with_other_username_rejected(server, pki):
    code, _ = mosquitto_pub(
        server, pki, "--cert", str(pki["valid"][0]), "--key",
        str(pki["valid"][1]), "-u", "dev-2", "-t", "devices/dev-2/data",
        "-m", json.dumps(reading("dev-2", 43)))
    assert code != 0


def test_mqtts_cert_with_other_devices_password_rejected(server, pki):
    code, _ = mosquitto_pub(
        server, pki, "--cert", str(pki["valid"][0]), "--key",
        str(pki["valid"][1]), "-u", "dev-1", "-P", server.keys["dev-2"],
        "-t", "devices/dev-1/data", "-m", json.dumps(reading(value=44)))
    assert code != 0


def test_mqtts_cert_cannot_publish_for_another(server, pki):
    client = paho_client(server, pki, "valid")
    try:
        info = client.publish("devices/dev-2/data",
                              json.dumps(reading("dev-2", 45)), qos=1)
        info.wait_for_publish(timeout=TIMEOUT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    time.sleep(0.5)
    assert not [r for r in server.records()
                if r["device_id"] == "dev-2"
                and r["payload"].get("sensor_value") == 45]


def paho_client(server, pki, cert, port=None, transport="tcp",
                client_id=None):
    """Return a connected paho client over TLS with client cert `cert`."""
    client = paho.Client(client_id=client_id or f"tls-{random.random()}",
                         protocol=paho.MQTTv311, transport=transport)
    client.tls_set(ca_certs=str(pki["ca"]), certfile=str(pki[cert][0]),
                   keyfile=str(pki[cert][1]))
    connected = threading.Event()
    result = {}

    def on_connect(c, userdata, flags, rc):
        result["rc"] = rc
        connected.set()

    client.on_connect = on_connect
    if transport == "websockets":
        client.ws_set_options(path="/mqtt")
    client.connect("127.0.0.1", port or server.mqtts_port, keepalive=30)
    client.loop_start()
    assert connected.wait(TIMEOUT_S), "no CONNACK"
    assert result["rc"] == 0, f"CONNACK return code {result['rc']}"
    return client


def test_paho_over_tls(server, pki):
    client = paho_client(server, pki, "valid")
    try:
        info = client.publish("devices/dev-1/data",
                              json.dumps(reading(value=46)), qos=1)
        info.wait_for_publish(timeout=TIMEOUT_S)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    wait_for_value(server, 46)


def test_paho_mqtt_over_wss_client_cert(server, pki):
    client = paho_client(server, pki, "valid", port=server.https_port,
                         transport="websockets")
    try:
        info = client.publish("devices/dev-1/data",
                              json.dumps(reading(value=47)), qos=1)
        info.wait_for_publish(timeout=TIMEOUT_S)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()
    wait_for_value(server, 47)


def test_mqtts_alpn_selects_mqtt(server, pki):
    ctx = client_context(pki, "valid", alpn=["mqtt"])
    with socket.create_connection(("127.0.0.1", server.mqtts_port),
                                  timeout=TIMEOUT_S) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.selected_alpn_protocol() == "mqtt"


def test_sigterm_closes_pending_handshakes(tmp_path, pki):
    """A connection that never starts its handshake must not hold up a
    stop: with a one-hour handshake timeout, only the drain closes it."""
    s = start_tls_server(tmp_path / "pending", pki,
                         http={"header_timeout": "1h"})
    lines = s.config.read_text().replace(
        "mqtt:\n", "mqtt:\n  connect_timeout: 1h\n", 1)
    s.config.write_text(lines)
    stop(s)
    with open(s.log, "ab") as log_file:
        s.proc = subprocess.Popen([binary(), "serve", "-c", str(s.config)],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    wait_ready(s.proc, s.admin_url, s.log)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
            for port in (s.https_port, s.mqtts_port)]
    try:
        s.wait_log("listener=https peer=")
        # MQTTS logs nothing before the handshake; its accept runs on the
        # same kind of loop right away.
        time.sleep(0.2)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        for sock in idle:
            assert sock.recv(1) == b""
    finally:
        for sock in idle:
            sock.close()
        stop(s)


# ---- client_auth required and identity from a URI SAN ----


def test_required_client_auth_and_san_uri(tmp_path, pki):
    s = start_tls_server(tmp_path / "required", pki,
                         tls={"client_auth": "required",
                              "identity": "san_uri"})
    try:
        before = s.metric("ingestd_tls_client_cert_failures_total",
                          'reason="missing"')
        assert handshake_fails(s.https_port, client_context(pki))
        s.wait_log("reason=missing ")
        assert s.metric("ingestd_tls_client_cert_failures_total",
                        'reason="missing"') == before + 1

        # CN=dev-1 without a URI SAN names no device under san_uri.
        assert handshake_fails(s.https_port, client_context(pki, "valid"))
        s.wait_log("reason=no_identity ")

        r = requests.post(s.https_url + "/v1/data",
                          json=reading("dev-2"), verify=str(pki["ca"]),
                          cert=tuple(map(str, pki["san_uri"])),
                          timeout=TIMEOUT_S)
        assert r.status_code == 202, r.text
        s.wait_for_ids(r.json()["ids"])
    finally:
        finish(s)


# ---- Reload ----


def peer_serial(port, pki):
    ctx = client_context(pki)
    with socket.create_connection(("127.0.0.1", port),
                                  timeout=TIMEOUT_S) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert()["serialNumber"].upper()


def post_on(tls, key, value):
    """POST one reading on an open TLS socket; return the status line."""
    body = json.dumps(reading(value=value)).encode()
    tls.sendall(b"POST /v1/data HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\n"
                + f"X-API-Key: {key}\r\n".encode()
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(4096)
        assert chunk, "connection closed"
        data += chunk
    return data.split(b"\r\n", 1)[0].decode()


def test_sighup_reloads_certificate(tmp_path, pki):
    s = start_tls_server(tmp_path / "reload", pki,
                         http={"idle_timeout": "30s"})
    try:
        old_serial = tls_certs.serial_of(pki["server"][0])
        new_serial = tls_certs.serial_of(pki["server2"][0])
        assert peer_serial(s.https_port, pki) == old_serial
        ctx = client_context(pki)
        raw = socket.create_connection(("127.0.0.1", s.https_port),
                                       timeout=TIMEOUT_S)
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as old:
            assert post_on(old, s.keys["dev-1"], 60).endswith("202 Accepted")

            shutil.copy(pki["server2"][0], s.folder / "server.crt")
            shutil.copy(pki["server2"][1], s.folder / "server.key")
            s.proc.send_signal(signal.SIGHUP)
            s.wait_log('"tls certificates reloaded on SIGHUP" listener=https')
            s.wait_log('"tls certificates reloaded on SIGHUP" listener=mqtts')

            assert peer_serial(s.https_port, pki) == new_serial
            assert peer_serial(s.mqtts_port, pki) == new_serial
            # The connection from before the reload keeps working.
            assert post_on(old, s.keys["dev-1"], 61).endswith("202 Accepted")

        # A key that does not match keeps the certificate in use.
        shutil.copy(pki["server"][1], s.folder / "server.key")
        s.proc.send_signal(signal.SIGHUP)
        s.wait_log("tls reload on SIGHUP failed")
        assert peer_serial(s.https_port, pki) == new_serial
    finally:
        finish(s)


def test_check_config_mismatched_key(tmp_path, pki):
    folder = tmp_path / "check"
    folder.mkdir()
    config = write_config(folder, free_port(), free_port())
    lines = config.read_text().splitlines()
    lines += ["https:", f"  listen: 127.0.0.1:{free_port()}"]
    lines += tls_lines(pki, {"client_auth": "optional"}, folder)
    config.write_text("\n".join(lines) + "\n")
    ok = subprocess.run([binary(), "check-config", "-c", str(config)],
                        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stderr

    shutil.copy(pki["server2"][1], folder / "server.key")
    bad = subprocess.run([binary(), "check-config", "-c", str(config)],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "the key does not match the certificate" in bad.stderr

    (folder / "server.key").unlink()
    missing = subprocess.run([binary(), "check-config", "-c", str(config)],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2
    assert "tls.key_file" in missing.stderr


# ---- SIGKILL under load over HTTPS and MQTTS ----


def https_sender(url, pki, stop_event, acked):
    session = requests.Session()
    # Per request, because requests prefers REQUESTS_CA_BUNDLE from the
    # environment over Session.verify.
    tls = {"verify": str(pki["ca"]), "cert": tuple(map(str, pki["valid"]))}
    n = 0
    while not stop_event.is_set():
        n += 1
        try:
            r = session.post(url, json=reading(value=n % 100), timeout=5,
                             **tls)
        except requests.RequestException:
            time.sleep(0.01)
            continue
        if r.status_code == 202:
            acked.extend(r.json()["ids"])


def mqtts_sender(port, pki, stop_event, acked, tag):
    """Publish QoS 1 readings with a seq over TLS; record acked seqs."""
    n = 0
    while not stop_event.is_set():
        client = paho.Client(client_id=f"crash-{tag}",
                             protocol=paho.MQTTv311)
        client.tls_set(ca_certs=str(pki["ca"]),
                       certfile=str(pki["valid2"][0]),
                       keyfile=str(pki["valid2"][1]))
        try:
            client.connect("127.0.0.1", port, keepalive=10)
        except OSError:
            time.sleep(0.05)
            continue
        client.loop_start()
        try:
            while not stop_event.is_set():
                n += 1
                seq = f"{tag}-{n}"
                body = {"device_id": "dev-2", "sensor_value": 1, "seq": seq}
                info = client.publish("devices/dev-2/data", json.dumps(body),
                                      qos=1)
                info.wait_for_publish(timeout=2)
                if info.is_published():
                    acked.append(seq)
                elif not client.is_connected():
                    break
        except (RuntimeError, ValueError):
            pass
        finally:
            client.loop_stop()
            client.disconnect()


def test_sigkill_over_tls_loses_no_acked_reading(tmp_path, pki):
    folder = tmp_path / "crash"
    s = start_tls_server(folder, pki)
    acked_http, acked_mqtt = [], []
    try:
        for _ in range(3):
            stop_event = threading.Event()
            threads = [
                threading.Thread(target=https_sender,
                                 args=(s.https_url + "/v1/data", pki,
                                       stop_event, acked_http))
                for _ in range(3)
            ] + [
                threading.Thread(target=mqtts_sender,
                                 args=(s.mqtts_port, pki, stop_event,
                                       acked_mqtt, f"m{i}"))
                for i in range(2)
            ]
            for t in threads:
                t.start()
            time.sleep(random.uniform(0.5, 1.5))
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait(timeout=10)
            stop_event.set()
            for t in threads:
                t.join(timeout=30)
                assert not t.is_alive(), "a sender did not stop"
            with open(s.log, "ab") as log_file:
                s.proc = subprocess.Popen(
                    [binary(), "serve", "-c", str(s.config)],
                    stdout=log_file, stderr=subprocess.STDOUT)
            wait_ready(s.proc, s.admin_url, s.log)
        assert acked_http, "no HTTPS reading was acknowledged"
        assert acked_mqtt, "no MQTTS reading was acknowledged"
        deadline = time.monotonic() + 60
        while True:
            records = s.records()
            ids = {r["message_id"] for r in records}
            seqs = {r["payload"].get("seq") for r in records
                    if isinstance(r.get("payload"), dict)}
            missing_http = set(acked_http) - ids
            missing_mqtt = set(acked_mqtt) - seqs
            if not missing_http and not missing_mqtt:
                break
            assert time.monotonic() < deadline, (
                f"{len(missing_http)} HTTPS and {len(missing_mqtt)} MQTTS "
                f"acknowledged readings missing")
            time.sleep(0.2)
    finally:
        finish(s)


# ---- The bridge to a TLS broker ----


def test_bridge_to_tls_broker(tmp_path, pki):
    import test_bridge as tb

    broker = tb.Broker(tmp_path / "broker")
    tls_port = free_port()
    server_cert, server_key = pki["server"]
    with open(broker.config, "a") as f:
        f.write(f"listener {tls_port} 127.0.0.1\n"
                f"cafile {pki['ca']}\n"
                f"certfile {server_cert}\n"
                f"keyfile {server_key}\n"
                "require_certificate true\n"
                "tls_version tlsv1.2\n")
    broker.start()
    server = None
    try:
        server = tb.start_bridge_server(
            tmp_path / "ingestd", tls_port, tls_ca_file=pki["ca"],
            tls_cert_file=pki["valid"][0], tls_key_file=pki["valid"][1])
        tb.wait_connected(server)
        broker.publish("devices/dev-1/data", tb.reading(7001 % 101, 70))
        records = tb.wait_until(
            lambda: [r for r in server.output_records()
                     if r["device_id"] == "dev-1"
                     and r["payload"].get("sensor_value") == 70],
            "the bridged reading in the output")
        assert records[0]["protocol"] == "mqtt-bridge"
    finally:
        if server is not None:
            tb.finish(server)
        broker.stop()


def test_mqtts_cert_with_jwt_password(server, pki, tmp_path):
    """A JWT of the certificate's device works as the MQTT password; one of
    another device is rejected."""
    from jwt_tokens import new_key, public_pem, token

    key = new_key("EdDSA")
    pem = tmp_path / "dev-1.pub.pem"
    pem.write_bytes(public_pem(key))
    run_cli("device", "set-jwt-key", "dev-1", "--alg", "EdDSA",
            "--public-key", str(pem), config=server.config)
    good = token("EdDSA", key, "dev-1")
    other = token("EdDSA", key, "dev-2")
    cert = ["--cert", str(pki["valid"][0]), "--key", str(pki["valid"][1])]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            code, err = mosquitto_pub(
                server, pki, *cert, "-u", "dev-1", "-P", good, "-t",
                "devices/dev-1/data", "-m", json.dumps(reading(value=47)))
            if code == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # the registry reload picks up the JWT key
        assert code == 0, err
        wait_for_value(server, 47)
        code, _ = mosquitto_pub(
            server, pki, *cert, "-u", "dev-1", "-P", other, "-t",
            "devices/dev-1/data", "-m", json.dumps(reading(value=48)))
        assert code != 0
    finally:
        run_cli("device", "clear-jwt", "dev-1", config=server.config)
