"""``dsmt-pki`` as operators run it: a real process, its exit status, stdout and stderr."""
from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from dsmt.transports.soap import pki

CLI = [sys.executable, "-m", "dsmt.client.dsmt_pki"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60)


def test_round_trip(tmp_path):
    directory = str(tmp_path / "ca")
    made = run("ca", directory, "--name", "dsmt test CA")   # the default: RSA 3072
    assert made.returncode == 0, made.stderr
    assert f"CA certificate: {directory}/ca.pem" in made.stdout
    assert stat.S_IMODE(os.stat(f"{directory}/ca.key").st_mode) == 0o600

    service = run("issue", directory, "--service", "nodemanager", "--dns", "node1.example", "--dns", "node1",
                  "--key", "ec")
    assert service.returncode == 0, service.stderr
    assert f"certificate: {directory}/service-nodemanager.pem" in service.stdout
    user = run("issue", directory, "--user", "alice", "--key", "ec", "--days", "30")
    assert user.returncode == 0, user.stderr

    shown = run("show", f"{directory}/service-nodemanager.pem")
    assert shown.returncode == 0
    assert "subject:     CN=nodemanager,OU=service" in shown.stdout
    assert "issuer:      CN=dsmt test CA" in shown.stdout
    assert "DNS names:   node1.example, node1" in shown.stdout
    assert "key:         EC secp256r1" in shown.stdout
    assert "key:         RSA 3072 bits" in run("show", f"{directory}/ca.pem").stdout

    ok = run("verify", f"{directory}/service-nodemanager.pem", "--ca", f"{directory}/ca.pem", "--purpose", "server",
             "--dns", "node1.example")
    assert (ok.returncode, ok.stdout.strip()) == (0, "CN=nodemanager,OU=service: valid for serverAuth as "
                                                     "node1.example")
    refused = run("verify", f"{directory}/user-alice.pem", "--ca", f"{directory}/ca.pem", "--purpose", "server")
    assert refused.returncode == 1
    assert refused.stderr.strip() == ("dsmt-pki: certificate CN=alice,OU=user is not valid for serverAuth "
                                      "(its extended key usage: clientAuth)")

    # what the files are for: a service trusting the CA verifies what alice signs
    from dsmt.transports.soap.wssec import Signer, Verifier
    envelope = (b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body><p xmlns="urn:p"/>'
                b'</s:Body></s:Envelope>')
    data = Signer.from_files(f"{directory}/user-alice.key", f"{directory}/user-alice.pem").sign(envelope)
    caller = Verifier(pki.TrustStore.from_files(f"{directory}/ca.pem")).verify(data)
    assert caller.subject == "CN=alice,OU=user"


@pytest.mark.parametrize("args, status, message", [
    (["issue", "{dir}", "--user", "bob", "--key", "ec"], 1,
     "dsmt-pki: {dir} holds no CA (ca.pem missing); create one with: dsmt-pki ca {dir}"),
    (["show", "{dir}/missing.pem"], 1, "dsmt-pki: certificate file {dir}/missing.pem does not exist"),
    (["ca", "{dir}", "--name", "x", "--key", "dsa"], 2, "invalid choice: 'dsa'"),
    (["issue", "{dir}", "--user", "a/b"], 2, "dsmt-pki: user name 'a/b' may hold only letters, digits"),
    (["issue", "{dir}"], 2, "one of the arguments --service --user is required"),
    (["ca", "{dir}", "--name", "x", "--days", "0", "--key", "ec"], 2,
     "dsmt-pki: validity must be a positive number of days, not 0"),
])
def test_errors(tmp_path, args, status, message):
    directory = str(tmp_path)
    result = run(*[arg.format(dir=directory) for arg in args])
    assert result.returncode == status
    assert message.format(dir=directory) in result.stderr
    assert "Traceback" not in result.stderr


def test_refuses_to_overwrite(tmp_path):
    directory = str(tmp_path)
    assert run("ca", directory, "--name", "CA", "--key", "ec").returncode == 0
    assert run("issue", directory, "--user", "alice", "--key", "ec").returncode == 0
    again = run("issue", directory, "--user", "alice", "--key", "ec")
    assert again.returncode == 1
    assert again.stderr.strip() == f"dsmt-pki: {directory}/user-alice.pem already exists; refusing to overwrite it"
    dns_for_user = run("issue", directory, "--user", "bob", "--dns", "x.example", "--key", "ec")
    assert (dns_for_user.returncode, dns_for_user.stderr.strip()) == (
        2, "dsmt-pki: only service certificates carry DNS names")
