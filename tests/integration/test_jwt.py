"""JWT authentication over HTTP, WebSocket and MQTT, and the device
commands that configure JWT keys and certificate pins.

Tokens are signed in Python (see jwt_tokens.py). The server runs with
jwt.leeway 0 so that expiry tests need no waiting past exp, and with a
high failure limit so that rejection tests do not block 127.0.0.1; the
limit itself is tested in test_auth_guard.py.
"""

import asyncio
import hashlib
import json
import os
import stat
import subprocess
import time

import pytest
import requests
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatusCode

import mqtt_raw
from conftest import (add_device, binary, finish, free_port, run_cli, stop,
                      wait_ready, write_config, Server)
from jwt_tokens import b64url, b64url_decode, new_key, public_pem, token

TIMEOUT_S = 20
ALGS = ("RS256", "ES256", "EdDSA")


def write_auth_sections(config, jwt_lines, auth_lines):
    """Replace the auth section that conftest writes with `auth_lines`, and
    add a jwt section."""
    text = config.read_text()
    start = text.index("auth:\n")
    end = text.index("\n", text.index("max_failures_per_minute", start)) + 1
    section = "jwt:\n" + "".join(
        f"  {k}: {json.dumps(v) if isinstance(v, str) else v}\n"
        for k, v in jwt_lines.items())
    section += "auth:\n" + "".join(f"  {k}: {v}\n"
                                   for k, v in auth_lines.items())
    config.write_text(text[:start] + section + text[end:])


def start_jwt_server(folder, jwt_settings=None, auth_settings=None):
    """Start ingestd with JWT devices for each algorithm and return the
    server, the private keys and the HS256 secret."""
    folder.mkdir(parents=True, exist_ok=True)
    port, admin_port, mqtt_port = free_port(), free_port(), free_port()
    config = write_config(folder, port, admin_port, mqtt_port=mqtt_port)
    jwt_lines = dict({"leeway": "0s", "max_lifetime": "1h"},
                     **(jwt_settings or {}))
    auth_lines = dict({"max_failures_per_minute": 100000,
                       "block_duration": "1s"}, **(auth_settings or {}))
    write_auth_sections(config, jwt_lines, auth_lines)
    keys = {"key-1": add_device("key-1", config)}
    private = {}
    for alg in ALGS:
        device = alg.lower() + "-1"
        keys[device] = add_device(device, config)
        private[alg] = new_key(alg)
        pem = folder / f"{device}.pub.pem"
        pem.write_bytes(public_pem(private[alg]))
        run_cli("device", "set-jwt-key", device, "--alg", alg,
                "--public-key", str(pem), config=config)
    add_device("hs256-1", config)
    out = run_cli("device", "new-jwt-secret", "hs256-1", config=config)
    secret_text = out.strip().splitlines()[-1]
    add_device("off-1", config)
    pem = folder / "off-1.pub.pem"
    private["off"] = new_key("EdDSA")
    pem.write_bytes(public_pem(private["off"]))
    run_cli("device", "set-jwt-key", "off-1", "--alg", "EdDSA",
            "--public-key", str(pem), config=config)
    run_cli("device", "disable", "off-1", config=config)
    log = folder / "ingestd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(host="127.0.0.1", port=port, admin_port=admin_port,
                    base_url=f"http://127.0.0.1:{port}",
                    admin_url=f"http://127.0.0.1:{admin_port}", keys=keys,
                    data_dir=folder / "data", config=config, log=log,
                    proc=proc, mqtt_port=mqtt_port)
    try:
        wait_ready(proc, server.admin_url, log)
    except BaseException:
        stop(server)
        raise
    secret = b64url_decode(secret_text)
    return server, private, secret, secret_text


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    server, private, secret, secret_text = start_jwt_server(
        tmp_path_factory.mktemp("jwt"))
    yield {"server": server, "keys": private, "secret": secret,
           "secret_text": secret_text}
    finish(server)


def device_of(alg):
    return "hs256-1" if alg == "HS256" else alg.lower() + "-1"


def valid_token(env, alg, **kwargs):
    key = env["secret"] if alg == "HS256" else env["keys"][alg]
    return token(alg, key, device_of(alg), **kwargs)


def post(server, credential, body=None):
    return requests.post(
        server.base_url + "/v1/data",
        data=json.dumps(body or {"sensor_value": 5}),
        headers={"Content-Type": "application/json",
                 "Authorization": f"Bearer {credential}"},
        timeout=10)


def assert_invalid_token(resp, reason):
    """Check a 401 answer: RFC 6750 header and a JSON body naming the
    reason."""
    assert resp.status_code == 401, resp.text
    header = resp.headers["WWW-Authenticate"]
    assert header.startswith('Bearer error="invalid_token"'), header
    assert "error_description=" in header
    body = resp.json()
    assert body["error"] == "invalid_credentials"
    assert body["message"].startswith(reason + ":"), body


# ---- HTTP ----

@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_http_bearer_jwt_accepted(env, alg):
    resp = post(env["server"], valid_token(env, alg))
    assert resp.status_code == 202, resp.text


def test_http_api_key_still_accepted(env):
    resp = post(env["server"], env["server"].keys["key-1"])
    assert resp.status_code == 202, resp.text


def hostile_tokens(env):
    """(name, token, expected reason) for every rejection case."""
    ed = env["keys"]["EdDSA"]
    rsa_pem = public_pem(env["keys"]["RS256"])
    now = int(time.time())
    unsigned = (b64url(json.dumps({"alg": "none"}).encode()) + "." +
                b64url(json.dumps({"sub": "eddsa-1",
                                   "exp": now + 60}).encode()))
    good = valid_token(env, "EdDSA")
    head, claims, sig = good.split(".")
    forged_claims = b64url(json.dumps({"sub": "eddsa-1",
                                       "exp": now + 600}).encode())
    return [
        ("expired", token("EdDSA", ed, "eddsa-1", exp_in=-5), "expired"),
        ("alg_none", unsigned + ".", "malformed"),
        ("alg_none_signed", unsigned + ".AAAA", "alg_not_allowed"),
        ("hs256_with_rsa_public_key",
         token("HS256", rsa_pem, "rs256-1"), "alg_not_allowed"),
        ("rs256_for_es256_device",
         token("RS256", env["keys"]["RS256"], "es256-1"), "alg_not_allowed"),
        ("tampered_claims", f"{head}.{forged_claims}.{sig}",
         "bad_signature"),
        ("wrong_key", token("EdDSA", new_key("EdDSA"), "eddsa-1"),
         "bad_signature"),
        ("missing_exp", token("EdDSA", ed, "eddsa-1", exp_in=None),
         "missing_exp"),
        ("nbf_in_future", token("EdDSA", ed, "eddsa-1", nbf=now + 120),
         "not_yet_valid"),
        ("iat_in_future", token("EdDSA", ed, "eddsa-1", iat=now + 120),
         "iat_in_future"),
        ("lifetime_too_long", token("EdDSA", ed, "eddsa-1", exp_in=7300),
         "lifetime_too_long"),
        ("unknown_sub", token("EdDSA", ed, "nobody"), "unknown_device"),
        ("api_key_device", token("EdDSA", ed, "key-1"),
         "jwt_not_configured"),
        ("bad_base64", "eyJhbGciOiJFZERTQSJ9.e30=.AAAA", "malformed"),
        ("not_json", b64url(b"{") + "." + b64url(b"{}") + ".AAAA",
         "malformed"),
    ]


def test_http_rejections(env):
    for name, tok, reason in hostile_tokens(env):
        resp = post(env["server"], tok)
        assert resp.status_code == 401, (name, resp.text)
        assert_invalid_token(resp, reason)


def test_http_disabled_device_403(env):
    tok = token("EdDSA", env["keys"]["off"], "off-1")
    resp = post(env["server"], tok)
    assert resp.status_code == 403, resp.text
    assert resp.json()["error"] == "device_disabled"


def test_http_oversize_token_401(env):
    tok = valid_token(env, "EdDSA", pad="x" * 1200)
    resp = post(env["server"], tok)
    assert resp.status_code == 401, resp.text


def test_auth_metrics_count_methods(env):
    post(env["server"], valid_token(env, "ES256"))
    text = env["server"].metrics()
    assert ('ingestd_auth_results_total{method="jwt",result="ok",'
            'reason=""}') in text
    assert ('ingestd_auth_results_total{method="jwt",result="rejected",'
            'reason="expired"}') in text
    assert "ingestd_auth_guard_entries" in text


# ---- WebSocket ----

def ws_connect(server, credential=None):
    headers = {}
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    return websockets.connect(f"ws://127.0.0.1:{server.port}/v1/ws",
                              extra_headers=headers, open_timeout=5,
                              close_timeout=5, ping_interval=None)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT_S))


async def expect_close(ws):
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    return info.value.code, info.value.reason


def test_ws_header_jwt(env):
    async def main():
        async with ws_connect(env["server"], valid_token(env, "RS256")) as ws:
            await ws.send(json.dumps({"sensor_value": 3}))
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    reply = run(main())
    assert reply["type"] == "ack", reply


def test_ws_first_message_jwt(env):
    async def main():
        async with ws_connect(env["server"]) as ws:
            await ws.send(json.dumps({"type": "auth",
                                      "key": valid_token(env, "ES256")}))
            return json.loads(await asyncio.wait_for(ws.recv(), 10))

    reply = run(main())
    assert reply == {"type": "auth_ok", "device_id": "es256-1"}


def test_ws_header_bad_jwt_401(env):
    async def main():
        async with ws_connect(env["server"],
                              token("EdDSA", env["keys"]["EdDSA"], "eddsa-1",
                                    exp_in=-5)):
            pass

    with pytest.raises(InvalidStatusCode) as info:
        run(main())
    assert info.value.status_code == 401


def test_ws_first_message_bad_jwt_1008(env):
    async def main():
        async with ws_connect(env["server"]) as ws:
            bad = token("HS256", public_pem(env["keys"]["RS256"]), "rs256-1")
            await ws.send(json.dumps({"type": "auth", "key": bad}))
            return await expect_close(ws)

    code, reason = run(main())
    assert code == 1008
    assert "alg_not_allowed" in reason


def test_ws_closes_when_token_expires(env):
    async def main():
        async with ws_connect(env["server"]) as ws:
            tok = valid_token(env, "EdDSA", exp_in=2)
            await ws.send(json.dumps({"type": "auth", "key": tok}))
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            code, reason = await expect_close(ws)
            return first, code, reason

    first, code, reason = run(main())
    assert first["type"] == "auth_ok"
    assert code == 1008
    assert reason == "token expired"


# ---- MQTT ----

def test_mqtt_password_jwt_v5_and_v311(env):
    server = env["server"]
    for version in (mqtt_raw.V5, mqtt_raw.V311):
        with mqtt_raw.Client(server.mqtt_port, version=version) as c:
            ack = c.connect(f"jwt-{version}", "es256-1",
                            valid_token(env, "ES256"))
            assert ack.type == mqtt_raw.CONNACK
            assert ack.reason == 0, ack


def test_mqtt_bad_jwt_v5_reason_string(env):
    server = env["server"]
    with mqtt_raw.Client(server.mqtt_port) as c:
        ack = c.connect("jwt-bad", "eddsa-1",
                        token("EdDSA", env["keys"]["EdDSA"], "eddsa-1",
                              exp_in=-5))
        assert ack.reason == 0x86, ack
        assert ack.reason_string.startswith("expired:"), ack
        assert c.closed()


def test_mqtt_jwt_of_other_device_rejected(env):
    server = env["server"]
    with mqtt_raw.Client(server.mqtt_port, version=mqtt_raw.V311) as c:
        ack = c.connect("jwt-other", "es256-1", valid_token(env, "EdDSA"))
        assert ack.reason == 0x04, ack


def test_mqtt_session_ends_at_token_expiry(env):
    server = env["server"]
    with mqtt_raw.Client(server.mqtt_port, timeout=10) as c:
        ack = c.connect("jwt-exp", "eddsa-1",
                        valid_token(env, "EdDSA", exp_in=3), keepalive=60)
        assert ack.reason == 0, ack
        packet = c.read(timeout=10)
        assert packet.type == mqtt_raw.DISCONNECT, packet
        assert packet.reason == 0xA0, packet
        assert c.closed()


def test_mqtt_v311_session_closes_at_token_expiry(env):
    server = env["server"]
    with mqtt_raw.Client(server.mqtt_port, version=mqtt_raw.V311,
                         timeout=10) as c:
        ack = c.connect("jwt-exp-311", "eddsa-1",
                        valid_token(env, "EdDSA", exp_in=2), keepalive=60)
        assert ack.reason == 0, ack
        assert c.closed(timeout=10)


# ---- Command line ----

def cli(config, *args):
    return subprocess.run([binary(), *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=30)


def test_cli_show_never_prints_secrets(env):
    config = env["server"].config
    out = run_cli("device", "show", "hs256-1", config=config)
    assert "jwt:                 HS256" in out
    assert "api key:             yes" in out
    assert env["secret_text"] not in out
    assert env["server"].keys.get("key-1") not in out
    out = run_cli("device", "show", "rs256-1", config=config)
    assert "RS256" in out
    assert "BEGIN PUBLIC KEY" not in out


def test_cli_certificate_pin_set_show_clear(env, tmp_path):
    config = env["server"].config
    add_device("cert-1", config)
    fp = hashlib.sha256(b"certificate").hexdigest()
    out = run_cli("device", "set-cert", "cert-1", "--fingerprint", fp,
                  config=config)
    colon = ":".join(fp[i:i + 2] for i in range(0, 64, 2)).upper()
    assert colon in out
    assert colon in run_cli("device", "show", "cert-1", config=config)
    run_cli("device", "clear-cert", "cert-1", config=config)
    assert "not pinned" in run_cli("device", "show", "cert-1", config=config)

    bad = cli(config, "device", "set-cert", "cert-1", "--fingerprint", "abc")
    assert bad.returncode == 2
    assert "64 hex digits" in bad.stderr
    both = cli(config, "device", "set-cert", "cert-1")
    assert both.returncode == 2


def test_cli_set_cert_from_pem(env, tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID
    import datetime

    key = new_key("ES256")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cert-2")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    path = tmp_path / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    config = env["server"].config
    add_device("cert-2", config)
    out = run_cli("device", "set-cert", "cert-2", "--cert", str(path),
                  config=config)
    want = cert.fingerprint(hashes.SHA256()).hex().upper()
    assert ":".join(want[i:i + 2] for i in range(0, 64, 2)) in out


def test_cli_jwt_key_rules(env, tmp_path):
    config = env["server"].config
    add_device("jwt-cli", config)
    pem = tmp_path / "rsa.pem"
    pem.write_bytes(public_pem(new_key("RS256")))
    wrong = cli(config, "device", "set-jwt-key", "jwt-cli", "--alg", "ES256",
                "--public-key", str(pem))
    assert wrong.returncode == 2
    assert "P-256" in wrong.stderr
    none = cli(config, "device", "set-jwt-key", "jwt-cli", "--alg", "none",
               "--public-key", str(pem))
    assert none.returncode == 2
    missing = cli(config, "device", "set-jwt-key", "nobody", "--alg",
                  "RS256", "--public-key", str(pem))
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    run_cli("device", "set-jwt-key", "jwt-cli", "--alg", "RS256",
            "--public-key", str(pem), config=config)
    assert "RS256" in run_cli("device", "show", "jwt-cli", config=config)
    run_cli("device", "clear-jwt", "jwt-cli", config=config)
    assert "jwt:                 no" in run_cli("device", "show", "jwt-cli",
                                               config=config)


def test_cli_change_takes_effect_without_restart(env):
    server = env["server"]
    tok = valid_token(env, "EdDSA")
    assert post(server, tok).status_code == 202
    run_cli("device", "clear-jwt", "eddsa-1", config=server.config)
    try:
        deadline = time.monotonic() + 10
        while post(server, tok).status_code != 401:
            assert time.monotonic() < deadline, "clear-jwt never applied"
            time.sleep(0.2)
    finally:
        pem = server.config.parent / "eddsa-1.pub.pem"
        run_cli("device", "set-jwt-key", "eddsa-1", "--alg", "EdDSA",
                "--public-key", str(pem), config=server.config)
    deadline = time.monotonic() + 10
    while post(server, tok).status_code != 202:
        assert time.monotonic() < deadline, "set-jwt-key never applied"
        time.sleep(0.2)


def test_registry_file_is_private(env):
    mode = stat.S_IMODE(os.stat(env["server"].data_dir /
                                "registry.db").st_mode)
    assert mode == 0o600
