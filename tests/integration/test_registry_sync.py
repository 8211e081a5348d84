"""`ingestd device export` and `device import`: one registry's devices,
with their API keys, JWT keys, HS256 secrets and certificate pins,
reproduced on another instance.

Instance A is only a registry: devices are added to it with the device
commands. Instance B is a running server with HTTPS and optional client
certificates, whose registry starts empty and is filled by importing A's
export. Everything runs on 127.0.0.1.
"""

import hashlib
import json
import subprocess
import time

import pytest
import requests

import tls_certs
from conftest import (add_device, binary, finish, free_port, run_cli, stop,
                      wait_ready, write_config)
from jwt_tokens import b64url_decode, new_key, public_pem, token

TIMEOUT_S = 20
JWT_ALGS = ("RS256", "ES256", "EdDSA")


def cli(config, *args, stdin=None):
    """Run an ingestd command and return the CompletedProcess."""
    return subprocess.run([binary(), *args, "-c", str(config)],
                          capture_output=True, text=True, timeout=30,
                          input=stdin)


def add_meter_type(config):
    """Add a second device type, "meter", to a conftest config."""
    text = config.read_text()
    schema = text.split("    schema_inline: ", 1)[1].split("\n", 1)[0]
    text = text.replace("device_types:\n",
                        "device_types:\n  meter:\n"
                        f"    schema_inline: {schema}\n", 1)
    config.write_text(text)


def make_instance_a(folder, pki):
    """Create instance A's config and devices. Returns the config, the API
    keys, the JWT private keys and the HS256 secret."""
    folder.mkdir(parents=True)
    config = write_config(folder, free_port(), free_port())
    add_meter_type(config)
    keys = {"key-1": add_device("key-1", config)}
    keys["meter-1"] = run_cli("device", "add", "meter-1", "--type", "meter",
                              config=config).strip().splitlines()[-1]

    private = {}
    for alg in JWT_ALGS:
        device = alg.lower() + "-1"
        add_device(device, config)
        private[alg] = new_key(alg)
        pem = folder / f"{device}.pem"
        pem.write_bytes(public_pem(private[alg]))
        run_cli("device", "set-jwt-key", device, "--alg", alg,
                "--public-key", str(pem), config=config)
    add_device("hs256-1", config)
    out = run_cli("device", "new-jwt-secret", "hs256-1", config=config)
    secret = b64url_decode(out.strip().splitlines()[-1])

    # dev-1 is pinned to the certificate it presents. dev-2 is pinned to a
    # fingerprint of other bytes, so its valid certificate must fail on B.
    add_device("dev-1", config)
    run_cli("device", "set-cert", "dev-1", "--cert", str(pki["valid"][0]),
            config=config)
    add_device("dev-2", config)
    run_cli("device", "set-cert", "dev-2", "--fingerprint",
            hashlib.sha256(b"another certificate").hexdigest(),
            config=config)

    keys["off-1"] = add_device("off-1", config)
    run_cli("device", "disable", "off-1", config=config)
    run_cli("device", "set-limits", "key-1", "--burst", "50", config=config)
    return config, keys, private, secret


class Instance:
    """A running ingestd with an HTTPS listener."""

    def __init__(self, folder, config, proc, log, ports):
        self.folder = folder
        self.config = config
        self.proc = proc
        self.log = log
        self.base_url = f"http://127.0.0.1:{ports[0]}"
        self.admin_url = f"http://127.0.0.1:{ports[1]}"
        self.https_url = f"https://127.0.0.1:{ports[3]}"


def make_instance_b_config(folder, pki):
    """Write instance B's config: HTTPS with optional client certificates,
    a registry reload every 200 ms. Returns the config and its ports."""
    folder.mkdir(parents=True)
    ports = [free_port() for _ in range(4)]
    config = write_config(folder, ports[0], ports[1], mqtt_port=ports[2])
    add_meter_type(config)
    lines = config.read_text().splitlines()
    lines += ["registry:", "  reload_interval: 200ms",
              "https:", f"  listen: 127.0.0.1:{ports[3]}",
              "tls:", f"  cert_file: {pki['server'][0]}",
              f"  key_file: {pki['server'][1]}", f"  ca_file: {pki['ca']}",
              "  client_auth: optional"]
    config.write_text("\n".join(lines) + "\n")
    return config, ports


def start_instance(folder, config, ports):
    log = folder / "ingestd.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([binary(), "serve", "-c", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT)
    instance = Instance(folder, config, proc, log, ports)
    try:
        wait_ready(proc, instance.admin_url, log)
    except BaseException:
        stop(instance)
        raise
    return instance


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Instance A's registry and export, and a running instance B that
    imported the export before it started."""
    root = tmp_path_factory.mktemp("sync")
    pki = tls_certs.make_pki(root / "pki")
    config_a, keys, private, secret = make_instance_a(root / "a", pki)
    export = cli(config_a, "device", "export", "--include-secrets")
    assert export.returncode == 0, export.stderr
    export_file = root / "devices.jsonl"
    export_file.write_text(export.stdout)
    config_b, ports = make_instance_b_config(root / "b", pki)
    imported = cli(config_b, "device", "import", str(export_file))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout == "9 added, 0 updated, 0 unchanged, 0 deleted\n"
    b = start_instance(root / "b", config_b, ports)
    yield {"root": root, "pki": pki, "a": config_a, "b": b, "keys": keys,
           "private": private, "secret": secret, "export": export_file}
    finish(b)


def post(url, credential=None, device_id=None, **kwargs):
    headers = {"Content-Type": "application/json"}
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    body = {"sensor_value": 5}
    if device_id is not None:
        body["device_id"] = device_id
    return requests.post(url + "/v1/data", data=json.dumps(body),
                         headers=headers, timeout=TIMEOUT_S, **kwargs)


def wait_status(url, credential, want):
    """POST until the response has status `want`, at most TIMEOUT_S, because
    the server reloads the registry on its own schedule."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        resp = post(url, credential)
        if resp.status_code == want:
            return resp
        if time.monotonic() > deadline:
            raise AssertionError(
                f"expected {want} within {TIMEOUT_S} s, got "
                f"{resp.status_code}: {resp.text}")
        time.sleep(0.1)


def read_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# ---- The export format ----


def test_export_lines_hold_hashes_not_keys(env):
    lines = read_lines(env["export"].read_text())
    by_id = {line["id"]: line for line in lines}
    assert [line["id"] for line in lines] == sorted(by_id)
    assert all(line["schema_version"] == 1 for line in lines)
    key = env["keys"]["key-1"]
    assert by_id["key-1"]["key_hash"] == hashlib.sha256(
        key.encode()).hexdigest()
    assert key not in env["export"].read_text()
    assert by_id["key-1"]["limit_burst"] == 50
    assert by_id["meter-1"]["type"] == "meter"
    assert by_id["off-1"]["enabled"] is False
    cert_der = subprocess.run(
        ["openssl", "x509", "-in", str(env["pki"]["valid"][0]), "-outform",
         "DER"], capture_output=True, check=True, timeout=30).stdout
    assert by_id["dev-1"]["cert_fingerprint"] == hashlib.sha256(
        cert_der).hexdigest()
    assert by_id["es256-1"]["jwt_public_key"].startswith(
        "-----BEGIN PUBLIC KEY-----")
    assert b64url_decode(by_id["hs256-1"]["jwt_secret"]) == env["secret"]


def test_export_without_secrets_warns(env):
    out = cli(env["a"], "device", "export")
    assert out.returncode == 0, out.stderr
    assert "jwt_secret" not in out.stdout
    assert "warning" in out.stderr
    assert '"hs256-1"' in out.stderr
    assert "--include-secrets" in out.stderr
    hs = [line for line in read_lines(out.stdout) if line["id"] == "hs256-1"]
    assert hs[0]["jwt_alg"] == "HS256"


def test_export_rejects_replace_option(env):
    out = cli(env["a"], "device", "export", "--replace")
    assert out.returncode == 2
    assert "--replace applies only to device import" in out.stderr


# ---- Credentials from A work on B ----


def test_api_key_from_a_works_on_b(env):
    resp = post(env["b"].base_url, env["keys"]["key-1"])
    assert resp.status_code == 202, resp.text
    resp = post(env["b"].base_url, env["keys"]["meter-1"])
    assert resp.status_code == 202, resp.text


def test_disabled_device_stays_disabled(env):
    resp = post(env["b"].base_url, env["keys"]["off-1"])
    assert resp.status_code == 403, resp.text


@pytest.mark.parametrize("alg", JWT_ALGS)
def test_jwt_key_from_a_works_on_b(env, alg):
    jwt = token(alg, env["private"][alg], alg.lower() + "-1")
    resp = post(env["b"].base_url, jwt)
    assert resp.status_code == 202, resp.text


def test_hs256_secret_carried_with_include_secrets(env):
    jwt = token("HS256", env["secret"], "hs256-1")
    resp = post(env["b"].base_url, jwt)
    assert resp.status_code == 202, resp.text


def test_certificate_pin_from_a_works_on_b(env):
    pki = env["pki"]
    resp = post(env["b"].https_url, verify=str(pki["ca"]),
                cert=tuple(map(str, pki["valid"])))
    assert resp.status_code == 202, resp.text
    # dev-2's certificate is valid, but its pin names other bytes, so B
    # ends the handshake.
    with pytest.raises(requests.exceptions.SSLError):
        post(env["b"].https_url, verify=str(pki["ca"]),
             cert=tuple(map(str, pki["valid2"])))
    deadline = time.monotonic() + TIMEOUT_S
    while "reason=fingerprint_mismatch detail=\"device dev-2" not in (
            env["b"].log.read_text()):
        assert time.monotonic() < deadline, "no fingerprint_mismatch logged"
        time.sleep(0.05)


# ---- Import semantics ----


def test_import_twice_changes_nothing(env):
    out = cli(env["b"].config, "device", "import", str(env["export"]))
    assert out.returncode == 0, out.stderr
    assert out.stdout == "0 added, 0 updated, 9 unchanged, 0 deleted\n"


def test_import_from_stdin(env):
    out = cli(env["b"].config, "device", "import", "-",
              stdin=env["export"].read_text())
    assert out.returncode == 0, out.stderr
    assert out.stdout == "0 added, 0 updated, 9 unchanged, 0 deleted\n"


def test_running_b_sees_import_without_restart(env):
    late_key = add_device("late-1", env["a"])
    resp = post(env["b"].base_url, late_key)
    assert resp.status_code == 401, resp.text
    export = cli(env["a"], "device", "export", "--include-secrets")
    assert export.returncode == 0, export.stderr
    out = cli(env["b"].config, "device", "import", "-", stdin=export.stdout)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "1 added, 0 updated, 9 unchanged, 0 deleted\n"
    wait_status(env["b"].base_url, late_key, 202)

    # A key rotated on A reaches B as an update, with the old key in its
    # grace period.
    rotated = run_cli("device", "rotate-key", "late-1", "--grace", "1h",
                      config=env["a"]).strip().splitlines()[-1]
    export = cli(env["a"], "device", "export", "--include-secrets")
    out = cli(env["b"].config, "device", "import", "-", stdin=export.stdout)
    assert out.stdout == "0 added, 1 updated, 9 unchanged, 0 deleted\n"
    wait_status(env["b"].base_url, rotated, 202)
    assert post(env["b"].base_url, late_key).status_code == 202


def test_export_without_secrets_keeps_secret_on_b(env):
    export = cli(env["a"], "device", "export")
    out = cli(env["b"].config, "device", "import", "-", stdin=export.stdout)
    assert out.returncode == 0, out.stderr
    assert " 0 updated," in out.stdout
    jwt = token("HS256", env["secret"], "hs256-1")
    assert post(env["b"].base_url, jwt).status_code == 202


def test_export_without_secrets_fails_on_fresh_registry(env, tmp_path):
    config = write_config(tmp_path, free_port(), free_port())
    add_meter_type(config)
    export = cli(env["a"], "device", "export")
    line = [n for n, text in enumerate(export.stdout.splitlines(), 1)
            if '"hs256-1"' in text][0]
    out = cli(config, "device", "import", "-", stdin=export.stdout)
    assert out.returncode == 2
    assert f"line {line}: jwt_secret: missing for HS256" in out.stderr
    assert "--include-secrets" in out.stderr
    assert "ID" in run_cli("device", "list", config=config)
    assert "key-1" not in run_cli("device", "list", config=config)


def test_replace_deletes_devices_not_in_file(env):
    extra_key = add_device("only-on-b", env["b"].config)
    wait_status(env["b"].base_url, extra_key, 202)
    export = cli(env["a"], "device", "export", "--include-secrets")
    out = cli(env["b"].config, "device", "import", "-", stdin=export.stdout)
    assert out.stdout.endswith(" 0 deleted\n"), out.stdout
    out = cli(env["b"].config, "device", "import", "--replace", "-",
              stdin=export.stdout)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith(" unchanged, 1 deleted\n"), out.stdout
    assert "only-on-b" not in run_cli("device", "list",
                                      config=env["b"].config)
    wait_status(env["b"].base_url, extra_key, 401)
    assert post(env["b"].base_url, env["keys"]["key-1"]).status_code == 202


def test_replace_rejects_empty_input(env):
    out = cli(env["b"].config, "device", "import", "--replace", "-",
              stdin="")
    assert out.returncode == 2
    assert "the input has no devices" in out.stderr
    assert "key-1" in run_cli("device", "list", config=env["b"].config)


# ---- Validation: every error names its line, and nothing is imported ----

HASH = "ab" * 32
GOOD = {"schema_version": 1, "id": "new-1", "type": "default",
        "enabled": True, "key_hash": "cd" * 32}


def line(**fields):
    obj = dict(GOOD, id="new-2", key_hash=HASH)
    obj.update(fields)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


def invalid_cases():
    ed25519_pem = public_pem(new_key("EdDSA")).decode()
    ec_pem = public_pem(new_key("ES256")).decode()
    return {
        "bad hex": (line(key_hash="zz" * 32),
                    "line 2: key_hash: character 1 is not a hex digit"),
        "short hash": (line(cert_fingerprint="abc"),
                       "line 2: cert_fingerprint: expected 64 hex digits"),
        "unknown type": (line(type="no-such-type"),
                         'line 2: type: device type "no-such-type" is not '
                         "configured"),
        "bad PEM": (line(jwt_alg="RS256",
                         jwt_public_key="-----BEGIN PUBLIC KEY-----\nAA\n"
                                        "-----END PUBLIC KEY-----\n"),
                    "line 2: jwt_public_key: not a PEM public key"),
        "ES256 with Ed25519 key": (line(jwt_alg="ES256",
                                        jwt_public_key=ed25519_pem),
                                   "line 2: jwt_public_key: ES256 needs an "
                                   "EC public key on P-256"),
        "RS256 with EC key": (line(jwt_alg="RS256", jwt_public_key=ec_pem),
                              "line 2: jwt_public_key: RS256 needs an RSA "
                              "public key"),
        "duplicate id": (line(id="new-1"),
                         'line 2: id: device "new-1" is also on line 1'),
        "unknown schema_version": (line(schema_version=99),
                                   "line 2: schema_version: unsupported "
                                   "version 99"),
        "missing schema_version": (line(schema_version=None),
                                   "line 2: schema_version: missing"),
        "invalid JSON": ('{"schema_version": 1, "id": ',
                         "line 2: invalid JSON"),
        "unknown field": (line(colour="red"),
                          "line 2: colour: unknown field"),
    }


CASES = invalid_cases()


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_line_imports_nothing(env, tmp_path, case):
    bad, expected = CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + bad + "\n")
    before = run_cli("device", "list", config=env["b"].config)
    out = cli(env["b"].config, "device", "import", "--replace", str(path))
    assert out.returncode == 2, out.stdout
    assert expected in out.stderr
    assert "nothing imported" in out.stderr
    assert run_cli("device", "list", config=env["b"].config) == before
    assert "new-1" not in before


def test_missing_file_is_usage_error(env, tmp_path):
    out = cli(env["b"].config, "device", "import", str(tmp_path / "none"))
    assert out.returncode == 2
    assert "cannot open" in out.stderr
