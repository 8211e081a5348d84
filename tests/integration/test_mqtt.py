"""MQTT 3.1.1 and 5.0 against the real ingestd on loopback.

mosquitto_pub, mosquitto_sub and paho-mqtt are the client libraries. Where
a library cannot show a reason code or send a malformed packet, mqtt_raw
sends hand-encoded packets.
"""

import json
import subprocess
import threading
import time
import uuid

import paho.mqtt.client as paho
import paho.mqtt.properties as paho_props
import paho.mqtt.packettypes as paho_types
import pytest

import mqtt_raw as raw
from conftest import start_server, finish

MQTT_SETTINGS = {
    "receive_maximum": 4,
    "topic_alias_maximum": 4,
    "max_packet_size": "2KiB",
    "connect_timeout": "1s",
}


@pytest.fixture(scope="module")
def mqttd(tmp_path_factory):
    """A server with small MQTT limits, shared by this module."""
    server = start_server(tmp_path_factory.mktemp("mqttd"), mqtt=MQTT_SETTINGS)
    yield server
    finish(server)


def seq():
    """Return a unique marker to find one reading in the output."""
    return uuid.uuid4().hex


def reading(marker, value=42.0):
    return json.dumps({"sensor_value": value, "seq": marker})


def wait_for_seq(server, marker, timeout_s=10, count=1):
    """Wait until `count` records with payload seq `marker` are in the
    output. The sink writes after the ack, so a check right after a PUBACK
    must wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [r for r in server.output_records()
                 if r["payload"].get("seq") == marker]
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"reading {marker} not in the output")
        time.sleep(0.1)


def records_with_seq(server, marker):
    return [r for r in server.output_records()
            if r["payload"].get("seq") == marker]


def client(server, version=raw.V5):
    return raw.Client(server.mqtt_port, version=version)


def connected(server, device="dev-1", version=raw.V5, client_id=None,
              **kwargs):
    """Return a raw client after a successful CONNECT."""
    c = client(server, version)
    ack = c.connect(client_id or seq(), device, server.keys[device], **kwargs)
    assert ack.type == raw.CONNACK
    assert ack.reason == 0
    return c


# ---- client libraries ----

@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_pub_stores_reading(mqttd, version, qos):
    marker = seq()
    proc = subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqttd.mqtt_port),
         "-V", version, "-q", str(qos), "-i", f"pub-{marker}",
         "-u", "dev-1", "-P", mqttd.keys["dev-1"],
         "-t", "devices/dev-1/data", "-m", reading(marker)],
        capture_output=True, text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    [record] = wait_for_seq(mqttd, marker)
    assert record["protocol"] == "mqtt"
    assert record["device_id"] == "dev-1"
    assert record["mqtt"]["topic"] == "devices/dev-1/data"
    assert record["mqtt"]["qos"] == qos


def paho_publish(server, protocol, payload, qos=1, properties=None):
    """Publish one message with paho and return once it was acknowledged."""
    done = threading.Event()
    result = {}
    c = paho.Client(client_id=f"paho-{seq()}", protocol=protocol)
    c.username_pw_set("dev-1", server.keys["dev-1"])

    def on_connect(client_, userdata, flags, rc, props=None):
        result["connack"] = rc
        done.set()

    c.on_connect = on_connect
    c.connect("127.0.0.1", server.mqtt_port, keepalive=30)
    c.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
        assert result["connack"] == 0
        info = c.publish("devices/dev-1/data", payload, qos=qos,
                         properties=properties)
        info.wait_for_publish(timeout=10)
        assert info.is_published()
    finally:
        c.disconnect()
        c.loop_stop()


def test_paho_v311_publish(mqttd):
    marker = seq()
    paho_publish(mqttd, paho.MQTTv311, reading(marker))
    wait_for_seq(mqttd, marker)


def test_paho_v5_user_properties_in_envelope(mqttd):
    marker = seq()
    props = paho_props.Properties(paho_types.PacketTypes.PUBLISH)
    props.UserProperty = [("site", "north"), ("fw", "1.2")]
    props.ContentType = "application/json"
    paho_publish(mqttd, paho.MQTTv5, reading(marker), qos=1,
                 properties=props)
    [record] = wait_for_seq(mqttd, marker)
    assert record["content_type"] == "application/json"
    assert record["mqtt"]["user_properties"] == [["site", "north"],
                                                 ["fw", "1.2"]]


def test_array_payload_stores_every_reading(mqttd):
    marker = seq()
    body = json.dumps([{"sensor_value": 1, "seq": marker},
                       {"sensor_value": 2, "seq": marker}])
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", body, qos=1, packet_id=3))
        ack = c.read()
    assert ack.type == raw.PUBACK
    assert ack.reason == 0
    assert len(wait_for_seq(mqttd, marker, count=2)) == 2


# ---- CONNECT ----

@pytest.mark.parametrize("version,expected", [(raw.V5, 0x86),
                                              (raw.V311, 0x04)])
def test_connect_bad_password(mqttd, version, expected):
    with client(mqttd, version) as c:
        ack = c.connect(seq(), "dev-1", "ik_" + "A" * 43)
        assert ack.reason == expected
        assert c.closed()


@pytest.mark.parametrize("version,expected", [(raw.V5, 0x86),
                                              (raw.V311, 0x04)])
def test_connect_username_not_key_device(mqttd, version, expected):
    # dev-2's valid key with user name dev-1, and an unknown user name.
    for user in ("dev-1", "no-such-device"):
        with client(mqttd, version) as c:
            ack = c.connect(seq(), user, mqttd.keys["dev-2"])
            assert ack.reason == expected
            assert c.closed()


@pytest.mark.parametrize("version,expected", [(raw.V5, 0x87),
                                              (raw.V311, 0x05)])
def test_connect_disabled_device(mqttd, version, expected):
    with client(mqttd, version) as c:
        ack = c.connect(seq(), "dev-off", mqttd.keys["dev-off"])
        assert ack.reason == expected


@pytest.mark.parametrize("version,expected", [(raw.V5, 0x86),
                                              (raw.V311, 0x04)])
def test_connect_missing_credentials(mqttd, version, expected):
    with client(mqttd, version) as c:
        ack = c.connect(seq(), None, None)
        assert ack.reason == expected


def test_connect_assigns_client_id_v5(mqttd):
    with client(mqttd) as c:
        ack = c.connect("", "dev-1", mqttd.keys["dev-1"])
        assert ack.reason == 0
        assert ack.props[raw.PROP_ASSIGNED_CLIENT_ID].startswith("ingestd-")
        assert ack.props[raw.PROP_RETAIN_AVAILABLE] == 0
        assert ack.props[raw.PROP_RECEIVE_MAXIMUM] == 4
        assert ack.props[raw.PROP_TOPIC_ALIAS_MAXIMUM] == 4
        assert ack.props[raw.PROP_MAXIMUM_PACKET_SIZE] == 2048


def test_connect_empty_client_id_v311(mqttd):
    with client(mqttd, raw.V311) as c:
        assert c.connect("", "dev-1", mqttd.keys["dev-1"]).reason == 0
    with client(mqttd, raw.V311) as c:
        ack = c.connect("", "dev-1", mqttd.keys["dev-1"], clean=False)
        assert ack.reason == 0x02


def test_connect_timeout_closes(mqttd):
    with client(mqttd) as c:
        start = time.monotonic()
        assert c.closed(timeout=5)
        assert time.monotonic() - start >= 0.8


def test_first_packet_not_connect_closes(mqttd):
    with client(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", reading(seq())))
        assert c.closed()


def test_client_id_of_other_device_rejected(mqttd):
    shared = seq()
    with connected(mqttd, "dev-1", client_id=shared):
        with client(mqttd) as c:
            ack = c.connect(shared, "dev-2", mqttd.keys["dev-2"])
            assert ack.reason == 0x85


# ---- PUBLISH rejections ----

def test_other_device_topic_v5_qos1(mqttd):
    marker = seq()
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-2/data", reading(marker), qos=1,
                           packet_id=5))
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.reason == 0x87
        # The connection stays usable.
        c.send(raw.pingreq())
        assert c.read().type == raw.PINGRESP
    assert records_with_seq(mqttd, marker) == []


def test_other_device_topic_v5_qos0_disconnects(mqttd):
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-2/data", reading(seq())))
        pkt = c.read()
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason == 0x87
        assert c.closed()


def test_other_device_topic_v311_closes(mqttd):
    with connected(mqttd, version=raw.V311) as c:
        c.send(raw.publish("devices/dev-2/data", reading(seq()), qos=1,
                           version=raw.V311))
        assert c.closed()


def test_topic_outside_templates(mqttd):
    with connected(mqttd) as c:
        c.send(raw.publish("sensors/dev-1", reading(seq()), qos=1,
                           packet_id=6))
        ack = c.read()
        assert ack.type == raw.PUBACK
        assert ack.reason == 0x90
    with connected(mqttd, version=raw.V311) as c:
        c.send(raw.publish("sensors/dev-1", reading(seq()), qos=1,
                           version=raw.V311))
        assert c.closed()


def test_schema_violation_v5_reason_string(mqttd):
    marker = seq()
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", reading(marker, 120),
                           qos=2, packet_id=8))
        ack = c.read()
        assert ack.type == raw.PUBREC
        assert ack.reason == 0x99
        assert "/sensor_value" in ack.reason_string
        assert "100" in ack.reason_string
    assert records_with_seq(mqttd, marker) == []


def test_schema_violation_v311_acked_not_stored(mqttd):
    marker = seq()
    with connected(mqttd, version=raw.V311) as c:
        c.send(raw.publish("devices/dev-1/data", reading(marker, 120),
                           qos=1, packet_id=8, version=raw.V311))
        ack = c.read()
        assert ack.type == raw.PUBACK
        # A later valid message is still stored.
        good = seq()
        c.send(raw.publish("devices/dev-1/data", reading(good), qos=1,
                           packet_id=9, version=raw.V311))
        assert c.read().type == raw.PUBACK
    wait_for_seq(mqttd, good)
    assert records_with_seq(mqttd, marker) == []


def test_invalid_json_payload(mqttd):
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", "{not json", qos=1,
                           packet_id=2))
        ack = c.read()
        assert ack.reason == 0x99
        assert "JSON" in ack.reason_string


def test_retain_v5_disconnects(mqttd):
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", reading(seq()), qos=1,
                           retain=True))
        pkt = c.read()
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason == 0x9A


# ---- QoS 2 ----

def test_qos2_retransmission_stored_once(mqttd):
    marker = seq()
    msg = reading(marker)
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", msg, qos=2, packet_id=7))
        first = c.read()
        assert first.type == raw.PUBREC
        assert first.reason == 0
        c.send(raw.publish("devices/dev-1/data", msg, qos=2, packet_id=7,
                           dup=True))
        again = c.read()
        assert again.type == raw.PUBREC
        assert again.packet_id == 7
        c.send(raw.pubrel(7))
        comp = c.read()
        assert comp.type == raw.PUBCOMP
        assert comp.reason == 0
        c.send(raw.pubrel(7))
        unknown = c.read()
        assert unknown.type == raw.PUBCOMP
        assert unknown.reason == 0x92
    wait_for_seq(mqttd, marker)
    time.sleep(0.5)
    assert len(records_with_seq(mqttd, marker)) == 1


def test_qos2_state_survives_reconnect(mqttd):
    marker = seq()
    msg = reading(marker)
    cid = seq()
    expiry = [(raw.PROP_SESSION_EXPIRY, 60)]
    with connected(mqttd, client_id=cid, clean=False,
                   properties=expiry) as c:
        c.send(raw.publish("devices/dev-1/data", msg, qos=2, packet_id=11))
        assert c.read().type == raw.PUBREC
    time.sleep(0.2)
    with client(mqttd) as c:
        ack = c.connect(cid, "dev-1", mqttd.keys["dev-1"], clean=False,
                        properties=expiry)
        assert ack.reason == 0
        assert ack.session_present
        c.send(raw.publish("devices/dev-1/data", msg, qos=2, packet_id=11,
                           dup=True))
        assert c.read().type == raw.PUBREC
        c.send(raw.pubrel(11))
        comp = c.read()
        assert comp.type == raw.PUBCOMP
        assert comp.reason == 0
    wait_for_seq(mqttd, marker)
    time.sleep(0.5)
    assert len(records_with_seq(mqttd, marker)) == 1


# ---- malformed packets and limits ----

def assert_disconnect(c, reason):
    pkt = c.read()
    assert pkt.type == raw.DISCONNECT, pkt
    assert pkt.reason == reason, pkt
    assert c.closed()


def test_bad_remaining_length(mqttd):
    with connected(mqttd) as c:
        c.send(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
        assert_disconnect(c, 0x81)
    with connected(mqttd, version=raw.V311) as c:
        c.send(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]))
        assert c.closed()


def test_reserved_flags(mqttd):
    with connected(mqttd) as c:
        # PUBREL must have flags 0b0010.
        c.send(bytes([0x60, 0x02, 0x00, 0x01]))
        assert_disconnect(c, 0x81)


def test_publish_qos3(mqttd):
    with connected(mqttd) as c:
        c.send(bytes([0x36]) + raw.publish("devices/dev-1/data", "{}",
                                           qos=1)[1:])
        pkt = c.read()
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason >= 0x80
    with connected(mqttd, version=raw.V311) as c:
        c.send(bytes([0x36]) + raw.publish("devices/dev-1/data", "{}",
                                           qos=1, version=raw.V311)[1:])
        assert c.closed()


def test_malformed_counted_in_metrics(mqttd):
    with connected(mqttd) as c:
        c.send(bytes([0x60, 0x02, 0x00, 0x01]))
        c.closed()
    assert 'ingestd_mqtt_malformed_total{reason="reserved_flags"}' in (
        mqttd.metrics())


def test_keepalive_timeout(mqttd):
    with connected(mqttd, version=raw.V311, keepalive=1) as c:
        start = time.monotonic()
        assert c.closed(timeout=6)
        elapsed = time.monotonic() - start
        assert elapsed >= 1.2
        assert elapsed < 4


def test_keepalive_kept_by_pings(mqttd):
    with connected(mqttd, version=raw.V311, keepalive=1) as c:
        for _ in range(4):
            time.sleep(0.6)
            c.send(raw.pingreq())
            assert c.read().type == raw.PINGRESP


def test_max_packet_size(mqttd):
    big = json.dumps({"sensor_value": 1, "pad": "x" * 3000})
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", big, qos=1))
        assert_disconnect(c, 0x95)
    with connected(mqttd, version=raw.V311) as c:
        c.send(raw.publish("devices/dev-1/data", big, qos=1,
                           version=raw.V311))
        assert c.closed()


def test_receive_maximum_exceeded(mqttd):
    data = b"".join(raw.publish("devices/dev-1/data", reading(seq()), qos=1,
                                packet_id=i) for i in range(1, 7))
    with connected(mqttd) as c:
        c.send(data)
        types = []
        while True:
            pkt = c.read()
            types.append(pkt.type)
            if pkt.type == raw.DISCONNECT:
                assert pkt.reason == 0x93
                break
        assert c.closed()


def test_receive_maximum_v311_waits(mqttd):
    markers = [seq() for _ in range(8)]
    data = b"".join(raw.publish("devices/dev-1/data", reading(m), qos=1,
                                packet_id=i + 1, version=raw.V311)
                    for i, m in enumerate(markers))
    with connected(mqttd, version=raw.V311) as c:
        c.send(data)
        ids = [c.read().packet_id for _ in markers]
    assert ids == list(range(1, 9))
    for m in markers:
        wait_for_seq(mqttd, m)


def test_topic_alias(mqttd):
    first, second = seq(), seq()
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", reading(first), qos=1,
                           packet_id=1,
                           properties=[(raw.PROP_TOPIC_ALIAS, 1)]))
        assert c.read().reason == 0
        c.send(raw.publish("", reading(second), qos=1, packet_id=2,
                           properties=[(raw.PROP_TOPIC_ALIAS, 1)]))
        assert c.read().reason == 0
    [record] = wait_for_seq(mqttd, second)
    assert record["mqtt"]["topic"] == "devices/dev-1/data"


def test_topic_alias_invalid(mqttd):
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", reading(seq()), qos=1,
                           properties=[(raw.PROP_TOPIC_ALIAS, 5)]))
        assert_disconnect(c, 0x94)
    with connected(mqttd) as c:
        c.send(raw.publish("devices/dev-1/data", reading(seq()), qos=1,
                           properties=[(raw.PROP_TOPIC_ALIAS, 0)]))
        assert_disconnect(c, 0x94)
    with connected(mqttd) as c:
        c.send(raw.publish("", reading(seq()), qos=1,
                           properties=[(raw.PROP_TOPIC_ALIAS, 2)]))
        assert_disconnect(c, 0x82)


# ---- sessions ----

@pytest.mark.parametrize("version", [raw.V5, raw.V311])
def test_session_takeover(mqttd, version):
    cid = seq()
    old = connected(mqttd, version=version, client_id=cid)
    try:
        with connected(mqttd, version=version, client_id=cid) as new:
            if version == raw.V5:
                pkt = old.read()
                assert pkt.type == raw.DISCONNECT
                assert pkt.reason == 0x8E
            assert old.closed()
            new.send(raw.pingreq())
            assert new.read().type == raw.PINGRESP
    finally:
        old.close()


# ---- feedback ----

def test_feedback_subscription_gets_validation_error(mqttd):
    marker = seq()
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqttd.mqtt_port),
         "-V", "mqttv5", "-i", f"sub-{marker}", "-u", "dev-1",
         "-P", mqttd.keys["dev-1"], "-t", "devices/dev-1/#", "-C", "1",
         "-W", "15", "-v"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait until the subscription exists: publish until it arrives.
        deadline = time.monotonic() + 10
        with connected(mqttd) as c:
            n = 0
            while sub.poll() is None and time.monotonic() < deadline:
                n += 1
                c.send(raw.publish("devices/dev-1/data",
                                   reading(marker, 500), qos=1,
                                   packet_id=n))
                assert c.read().reason == 0x99
                time.sleep(0.3)
        out, err = sub.communicate(timeout=15)
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait()
    assert sub.returncode == 0, err
    topic, payload = out.strip().split(" ", 1)
    assert topic == "devices/dev-1/errors"
    body = json.loads(payload)
    assert body["error"] == "validation_failed"
    assert body["topic"] == "devices/dev-1/data"
    assert body["packet_id"] >= 1
    assert body["readings"][0]["errors"][0]["pointer"] == "/sensor_value"


@pytest.mark.parametrize("version,expected", [(raw.V5, 0x87),
                                              (raw.V311, 0x80)])
def test_subscribe_other_namespace_refused(mqttd, version, expected):
    with connected(mqttd, version=version) as c:
        c.send(raw.subscribe(1, [("devices/dev-2/#", 0),
                                 ("devices/dev-1/errors", 1), ("#", 0)],
                             version=version))
        ack = c.read()
        assert ack.type == raw.SUBACK
        assert ack.codes == [expected, 0x00, expected]


def test_metrics_count_messages(mqttd):
    text = mqttd.metrics()
    assert 'ingestd_mqtt_messages_total{qos="1",result="accepted"}' in text
    assert 'ingestd_readings_total{protocol="mqtt",result="accepted"}' in text
    assert 'ingestd_mqtt_connections{transport="tcp"}' in text
    assert 'ingestd_mqtt_auth_failures_total{reason="bad_password"}' in text


# ---- servers of their own ----

def test_spool_full_quota_exceeded(ingestd_factory):
    server = ingestd_factory(spool={"max_size": "128KiB",
                                    "segment_size": "64KiB"},
                             sink={"fsync": "true", "batch_records": 1},
                             mqtt={"max_packet_size": "64KiB"})
    body = json.dumps([{"sensor_value": 1, "pad": "z" * 300}
                       for _ in range(20)])
    with connected(server) as c:
        for i in range(1, 400):
            c.send(raw.publish("devices/dev-1/data", body, qos=1,
                               packet_id=i))
            ack = c.read()
            if ack.reason != 0:
                break
        assert ack.reason == 0x97


def test_drain_sends_server_shutting_down(ingestd_factory):
    server = ingestd_factory()
    c = connected(server)
    c3 = connected(server, version=raw.V311)
    try:
        server.proc.send_signal(15)
        pkt = c.read()
        assert pkt.type == raw.DISCONNECT
        assert pkt.reason == 0x8B
        assert c3.closed()
        # Waiting here keeps the fixture from sending a second SIGTERM.
        assert server.proc.wait(timeout=20) == 0
    finally:
        c.close()
        c3.close()
