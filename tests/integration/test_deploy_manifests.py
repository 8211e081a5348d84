"""Offline checks of the deployment files under deploy/.

Kubernetes: `kubectl kustomize` renders the base and the production
overlay, and the checks below read the rendered objects. Client-side
`kubectl apply --dry-run` needs an API server for its schemas, so it is
not used. Compose: `docker-compose config` when installed, plus YAML
checks. systemd: `systemd-analyze verify` and `security --offline`.
Each config file the deployments mount is loaded by `ingestd
check-config`, with its absolute paths moved into a temporary folder.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import binary

yaml = pytest.importorskip(
    "yaml", reason="python3-yaml is missing; run scripts/install-deps.sh test")

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CLI_TIMEOUT_S = 60

DURATION_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
SIZE_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
              "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def duration_s(text):
    """Convert an ingestd or systemd duration such as 10s to seconds."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(text))
    assert m, f"not a duration: {text!r}"
    return int(m.group(1)) * DURATION_UNITS_S[m.group(2)]


def size_bytes(text):
    """Convert a size such as 10Gi (Kubernetes) or 4GiB (ingestd)."""
    m = re.fullmatch(r"(\d+)([KMGT]iB?)", str(text))
    assert m, f"not a size: {text!r}"
    return int(m.group(1)) * SIZE_UNITS[m.group(2)]


def listen_port(listen):
    """Return the port of an ingestd listen address."""
    return int(listen.rsplit(":", 1)[1])


def check_config(tmp_path, text, files):
    """Run `ingestd check-config` on `text` with its /etc and /var paths
    moved under `tmp_path`. `files` maps paths in the config to local
    files to copy there."""
    for target, source in files.items():
        local = tmp_path / target.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)
    text = re.sub(r"(?<![\w.])/(etc|var|run)/", lambda m: f"{tmp_path}/"
                  f"{m.group(1)}/", text)
    config = tmp_path / "check.yaml"
    config.write_text(text)
    proc = subprocess.run([binary(), "check-config", "-c", str(config)],
                          capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr


# ---- Kubernetes ----

@pytest.fixture(scope="module")
def kubectl():
    """The kubectl on PATH, or a skip naming the package to install."""
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl is missing: scripts/install-deps.sh test "
                    "installs Debian's kubernetes-client")
    return path


def render(kubectl, folder):
    """Render a kustomization and return its objects by (kind, name)."""
    proc = subprocess.run([kubectl, "kustomize", str(folder)],
                          capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    objects = {}
    for doc in yaml.safe_load_all(proc.stdout):
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in objects, f"{key} rendered twice"
        objects[key] = doc
    return objects


def only(objects, kind):
    """Return the one object of `kind`."""
    found = [o for (k, _), o in objects.items() if k == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


OVERLAYS = {
    "base": {"replicas": 2, "storage": "10Gi", "namespace": None},
    "overlays/production": {"replicas": 3, "storage": "100Gi",
                            "namespace": "ingestd"},
}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request, kubectl):
    """(expected values, rendered objects) for each kustomization."""
    return OVERLAYS[request.param], render(
        kubectl, DEPLOY / "k8s" / request.param)


def pod_spec(objects):
    """Return the StatefulSet's pod spec and its ingestd container."""
    spec = only(objects, "StatefulSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["ingestd"]
    return spec, spec["containers"][0]


def ingestd_config(objects):
    """Return the parsed ingestd.yaml of the rendered ConfigMap."""
    cm = only(objects, "ConfigMap")
    return yaml.safe_load(cm["data"]["ingestd.yaml"])


def test_k8s_statefulset_replicas_storage(rendered):
    expected, objects = rendered
    sts = only(objects, "StatefulSet")
    assert sts["spec"]["replicas"] == expected["replicas"]
    claims = sts["spec"]["volumeClaimTemplates"]
    assert [c["metadata"]["name"] for c in claims] == ["spool"]
    assert claims[0]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert (claims[0]["spec"]["resources"]["requests"]["storage"]
            == expected["storage"])


def test_k8s_namespace(rendered):
    expected, objects = rendered
    for (kind, name), obj in objects.items():
        if kind == "Namespace":
            continue
        assert obj["metadata"].get("namespace") == expected["namespace"], (
            kind, name)


def test_k8s_services(rendered):
    _, objects = rendered
    sts = only(objects, "StatefulSet")
    _, container = pod_spec(objects)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    port_names = {p["name"] for p in container["ports"]}
    headless = objects[("Service", sts["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    client = objects[("Service", "ingestd")]
    assert {p["port"] for p in client["spec"]["ports"]} == {8080, 1883}
    for svc in (headless, client):
        selector = svc["spec"]["selector"]
        assert selector.items() <= pod_labels.items()
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_k8s_ports_match_config(rendered):
    _, objects = rendered
    _, container = pod_spec(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    cfg = ingestd_config(objects)
    assert ports["http"] == listen_port(cfg["http"]["listen"])
    assert ports["mqtt"] == listen_port(cfg["mqtt"]["listen"])
    assert ports["admin"] == listen_port(cfg["admin"]["listen"])
    assert cfg["http"]["listen"].startswith("0.0.0.0:")


def test_k8s_probes(rendered):
    _, objects = rendered
    _, container = pod_spec(objects)
    live = container["livenessProbe"]["httpGet"]
    ready = container["readinessProbe"]["httpGet"]
    startup = container["startupProbe"]["httpGet"]
    assert (live["path"], live["port"]) == ("/healthz", "admin")
    assert (ready["path"], ready["port"]) == ("/readyz", "admin")
    assert (startup["path"], startup["port"]) == ("/healthz", "admin")


def test_k8s_grace_covers_drain(rendered):
    _, objects = rendered
    spec, container = pod_spec(objects)
    cfg = ingestd_config(objects)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep"
    drain = (int(command[1]) + duration_s(cfg["shutdown_timeout"])
             + duration_s(cfg["sinks_drain_timeout"]))
    assert spec["terminationGracePeriodSeconds"] > drain


def test_k8s_security_context(rendered):
    _, objects = rendered
    spec, container = pod_spec(objects)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["fsGroup"] == 10001
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "requests" in container["resources"]
    assert "limits" in container["resources"]


def test_k8s_volumes_and_mounts(rendered):
    _, objects = rendered
    spec, container = pod_spec(objects)
    cfg = ingestd_config(objects)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["spool"] == cfg["data_dir"]
    assert mounts["config"] == "/etc/ingestd"
    volumes = {v["name"]: v for v in spec["volumes"]}
    # kustomize rewrote the reference to the hashed ConfigMap name.
    cm = only(objects, "ConfigMap")
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]
    secret = only(objects, "Secret")
    assert volumes["secrets"]["secret"]["secretName"] == (
        secret["metadata"]["name"])


def test_k8s_secret_is_example(rendered):
    _, objects = rendered
    secret = only(objects, "Secret")
    values = secret.get("stringData", {})
    assert values, "the example Secret should show its keys"
    assert all(v == "replace-me" for v in values.values()), values


def test_k8s_pdb(rendered):
    _, objects = rendered
    pdb = only(objects, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = only(objects, "StatefulSet")["spec"]["template"]["metadata"][
        "labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_k8s_spool_fits_volume(rendered):
    expected, objects = rendered
    cfg = ingestd_config(objects)
    assert (size_bytes(cfg["spool"]["max_size"])
            < size_bytes(expected["storage"]))


def test_k8s_config_loads(rendered, tmp_path):
    _, objects = rendered
    cm = only(objects, "ConfigMap")
    schema = tmp_path / "schema.json"
    schema.write_text(cm["data"]["reading.json"])
    check_config(tmp_path, cm["data"]["ingestd.yaml"],
                 {"/etc/ingestd/reading.json": schema})


def test_k8s_init_container_imports_devices(rendered, tmp_path):
    _, objects = rendered
    spec, container = pod_spec(objects)
    init = spec["initContainers"]
    assert [c["name"] for c in init] == ["import-devices"]
    init = init[0]
    assert init["image"] == container["image"]
    args = init["args"]
    assert args[:3] == ["device", "import", "--replace"]
    assert args[3] == "/etc/ingestd/devices.jsonl"
    assert args[4:] == ["-c", "/etc/ingestd/ingestd.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    init_mounts = {m["name"]: m["mountPath"] for m in init["volumeMounts"]}
    assert init_mounts == mounts
    assert init["securityContext"] == container["securityContext"]
    assert "limits" in init["resources"]

    # The rendered command runs against the rendered config and device
    # list, with the /etc and /var paths moved under tmp_path.
    cm = only(objects, "ConfigMap")
    etc = tmp_path / "etc" / "ingestd"
    etc.mkdir(parents=True)
    (tmp_path / "var" / "lib" / "ingestd").mkdir(parents=True)
    for name, text in cm["data"].items():
        text = re.sub(r"(?<![\w.])/(etc|var|run)/",
                      lambda m: f"{tmp_path}/{m.group(1)}/", text)
        (etc / name).write_text(text)
    local_args = [re.sub(r"^/etc/", f"{tmp_path}/etc/", a) for a in args]
    proc = subprocess.run([binary(), *local_args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(" 0 deleted\n"), proc.stdout


def test_k8s_schema_copy_current():
    copy = DEPLOY / "k8s" / "base" / "reading.json"
    assert copy.read_text() == (REPO / "schemas" / "reading.json").read_text()


# ---- Container config ----

def test_container_config_loads(tmp_path):
    text = (DEPLOY / "container.yaml").read_text()
    check_config(tmp_path, text, {
        "/etc/ingestd/schemas/reading.json": REPO / "schemas" / "reading.json"})


# ---- Compose ----

def compose():
    """Return deploy/compose.yaml parsed."""
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_images_pinned_and_commented():
    lines = (DEPLOY / "compose.yaml").read_text().splitlines()
    images = [(i, line) for i, line in enumerate(lines)
              if line.strip().startswith("image:")]
    assert images
    for i, line in images:
        image = line.split("image:", 1)[1].strip()
        name, _, tag = image.rpartition(":")
        assert name, f"image without a name: {image}"
        assert tag and tag != "latest", f"unpinned image {image}"
        assert re.search(r"\d", tag), f"tag without a version: {image}"
        assert lines[i - 1].strip().startswith("#"), (
            f"no comment above image {image}")


def test_compose_services():
    doc = compose()
    services = doc["services"]
    assert {"ingestd-1", "ingestd-2", "haproxy", "kafka", "mosquitto",
            "prometheus", "grafana"} <= services.keys()
    for name in ("ingestd-1", "ingestd-2"):
        svc = services[name]
        assert svc["stop_signal"] == "SIGTERM"
        assert duration_s(svc["stop_grace_period"]) > 15
        assert svc["read_only"] is True
    kafka = services["kafka"]["environment"]
    assert "controller" in kafka["KAFKA_PROCESS_ROLES"]
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka
    for svc in services.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_compose_mounted_files_exist():
    doc = compose()
    for name, svc in doc["services"].items():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else (
                vol.split(":")[0])
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    for secret in doc["secrets"].values():
        assert (DEPLOY / secret["file"]).exists(), secret["file"]


def test_compose_configs_load(tmp_path):
    schema = REPO / "schemas" / "reading.json"
    texts = []
    for n in (1, 2):
        text = (DEPLOY / "compose" / f"ingestd-{n}.yaml").read_text()
        folder = tmp_path / str(n)
        folder.mkdir()
        check_config(folder, text,
                     {"/etc/ingestd/schemas/reading.json": schema})
        texts.append(yaml.safe_load(text))
    # The broker needs a client id per instance; nothing else differs.
    ids = [t["bridges"][0].pop("client_id") for t in texts]
    assert ids[0] != ids[1]
    assert texts[0] == texts[1]


def test_compose_config_command():
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.skip("docker-compose is missing (Debian docker-compose); "
                    "the YAML checks above still ran")
    proc = subprocess.run([tool, "-p", "ingestd", "-f",
                           str(DEPLOY / "compose.yaml"), "config", "-q"],
                          capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr


# ---- systemd ----

UNIT = DEPLOY / "systemd" / "ingestd.service"


def unit_settings():
    """Return the [Service] settings of the unit, each as a list."""
    settings = {}
    section = None
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_settings():
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["User"] == ["ingestd"]
    assert s["StateDirectory"] == ["ingestd"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["CapabilityBoundingSet"] == [""]
    assert s["ProtectSystem"] == ["strict"]
    assert s["NoNewPrivileges"] == ["true"]
    assert duration_s(s["WatchdogSec"][0]) >= 2
    # The drain of config/ingestd.yaml's defaults must fit the stop timeout.
    cfg = yaml.safe_load((REPO / "config" / "ingestd.yaml").read_text())
    drain = (duration_s(cfg["shutdown_timeout"])
             + duration_s(cfg["sinks_drain_timeout"]))
    assert duration_s(s["TimeoutStopSec"][0]) > drain


@pytest.fixture
def unit_copy(tmp_path):
    """The unit with the ingestd under test in place of
    /usr/local/bin/ingestd, which verify needs to exist."""
    exe = Path(binary()).resolve()
    if not exe.exists():
        pytest.skip(f"{exe} is missing; build ingestd first")
    copy = tmp_path / "ingestd.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/ingestd",
                                             str(exe)))
    return copy


def test_systemd_unit_verifies(unit_copy):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing (Debian systemd)")
    proc = subprocess.run([tool, "verify", str(unit_copy)],
                          capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    # Unknown keys are only warnings, so any line about the unit fails.
    ours = [line for line in proc.stderr.splitlines()
            if "ingestd.service" in line]
    assert ours == []


def test_systemd_unit_exposure(unit_copy):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is missing (Debian systemd)")
    proc = subprocess.run([tool, "security", "--offline=true",
                           str(unit_copy)],
                          capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    m = re.search(r"Overall exposure level for ingestd\.service: "
                  r"([0-9.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    # systemd rates 0 to 10; below 2.0 is its "OK" band.
    assert float(m.group(1)) < 2.0
