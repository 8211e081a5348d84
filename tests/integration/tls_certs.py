"""Test certificates made with the `openssl` command at test time.

A TestCA is a folder with an `openssl ca` database, so that certificates
get explicit validity dates (expired, not yet valid) and can be revoked
into a CRL. Keys are EC P-256, which keeps generation quick.
"""

import subprocess
from pathlib import Path

CA_CONFIG = """\
[ ca ]
default_ca = test_ca

[ test_ca ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
crlnumber = $dir/crlnumber
certificate = $dir/ca.crt
private_key = $dir/ca.key
default_md = sha256
default_days = 365
default_crl_days = 30
policy = policy_any
unique_subject = no
email_in_dn = no

[ policy_any ]
commonName = supplied

[ client ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
{client_san}

[ server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


def openssl(*args, cwd=None):
    """Run `openssl` with `args` and fail with its output on error."""
    proc = subprocess.run(["openssl", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)
    assert proc.returncode == 0, (
        f"openssl {' '.join(args)} exited with {proc.returncode}: "
        f"{proc.stderr}")
    return proc.stdout


def new_key(path):
    """Write a new EC P-256 private key to `path`."""
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt",
            "ec_paramgen_curve:P-256", "-out", str(path))
    return path


class TestCA:
    """A certificate authority in `folder`, named `name` in its subject."""

    __test__ = False  # not a pytest test class

    def __init__(self, folder, name):
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "issued").mkdir(exist_ok=True)
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        (self.dir / "crlnumber").write_text("1000\n")
        self.key = new_key(self.dir / "ca.key")
        self.cert = self.dir / "ca.crt"
        openssl("req", "-x509", "-new", "-key", str(self.key), "-sha256",
                "-days", "3650", "-subj", f"/CN={name}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                "-out", str(self.cert))
        self.crl = None

    def _config(self, client_san=None):
        path = self.dir / "ca.cnf"
        san = f"subjectAltName = {client_san}" if client_san else ""
        path.write_text(CA_CONFIG.format(dir=self.dir, client_san=san))
        return path

    def issue(self, name, cn, kind="client", start=None, end=None,
              san=None):
        """Issue a certificate for `cn` and return (cert, key) paths.

        `kind` is "client" or "server". `start` and `end` are validity
        dates as `openssl ca` takes them (YYYYMMDDHHMMSSZ); by default the
        certificate is valid from now for a year. `san` adds a
        subjectAltName to a client certificate, such as
        "URI:urn:device:dev-2".
        """
        key = new_key(self.dir / f"{name}.key")
        csr = self.dir / f"{name}.csr"
        cert = self.dir / f"{name}.crt"
        openssl("req", "-new", "-key", str(key), "-subj", f"/CN={cn}",
                "-out", str(csr))
        args = ["ca", "-batch", "-notext", "-config",
                str(self._config(san)), "-extensions", kind, "-in",
                str(csr), "-out", str(cert)]
        if start:
            args += ["-startdate", start]
        if end:
            args += ["-enddate", end]
        openssl(*args)
        return cert, key

    def revoke(self, cert):
        """Revoke `cert` and write a new CRL; return the CRL path."""
        openssl("ca", "-batch", "-config", str(self._config()), "-revoke",
                str(cert))
        return self.write_crl()

    def write_crl(self):
        """Write the CRL of every revoked certificate; return its path."""
        self.crl = self.dir / "crl.pem"
        openssl("ca", "-batch", "-config", str(self._config()), "-gencrl",
                "-out", str(self.crl))
        return self.crl


def serial_of(cert):
    """Return the serial number of the PEM certificate `cert` as hex."""
    out = openssl("x509", "-in", str(cert), "-noout", "-serial")
    return out.strip().split("=", 1)[1].upper()


def make_pki(folder):
    """Create every certificate the TLS tests use and return their paths.

    Returns a dict with the CA and its CRL, the server certificate for
    127.0.0.1 and localhost, a second server certificate for the reload
    test, and client certificates: "valid" (CN=dev-1), "valid2"
    (CN=dev-2), "expired", "not_yet_valid", "revoked", "wrong_ca" (CN=dev-1
    from another CA), "unknown" (CN=dev-unknown), "disabled" (CN=dev-off)
    and "san_uri" (CN=someone, URI:urn:device:dev-2). Each client entry is
    a (cert, key) pair.
    """
    folder = Path(folder)
    ca = TestCA(folder / "ca", "ingestd test CA")
    wrong = TestCA(folder / "wrong-ca", "ingestd wrong CA")
    pki = {"ca": ca.cert, "wrong_ca_cert": wrong.cert}
    pki["server"] = ca.issue("server", "127.0.0.1", kind="server")
    pki["server2"] = ca.issue("server2", "127.0.0.1", kind="server")
    pki["valid"] = ca.issue("dev-1", "dev-1")
    pki["valid2"] = ca.issue("dev-2", "dev-2")
    pki["expired"] = ca.issue("expired", "dev-1", start="20200101000000Z",
                              end="20210101000000Z")
    pki["not_yet_valid"] = ca.issue("future", "dev-1",
                                    start="20990101000000Z",
                                    end="20991231000000Z")
    pki["revoked"] = ca.issue("revoked", "dev-1")
    pki["unknown"] = ca.issue("unknown", "dev-unknown")
    pki["disabled"] = ca.issue("disabled", "dev-off")
    pki["san_uri"] = ca.issue("san-uri", "someone",
                              san="URI:urn:device:dev-2")
    pki["wrong_ca"] = wrong.issue("dev-1", "dev-1")
    pki["crl"] = ca.revoke(pki["revoked"][0])
    return pki
