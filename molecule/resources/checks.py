"""What the scenarios' testinfra tests check, run inside an instance.

Every probe is a small Python program run by the instance's own python3 (smtplib,
urllib): SMTP and HTTP are spoken inside the container's network namespace, as a
client on the same host would, and each probe is one round trip through Ansible.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

SINK_MAILDIR = "/var/tmp/sink"


def py(host: Any, code: str, *args: str, check: bool = True) -> Any:
    """Run ``code`` with the instance's python3; its stdout parsed as JSON."""
    cmd = host.run("python3 -c " + " ".join(["%s"] * (1 + len(args))),
                   textwrap.dedent(code), *args)
    if check:
        assert cmd.rc == 0, f"probe failed ({cmd.rc}):\n{cmd.stdout}\n{cmd.stderr}"
    return json.loads(cmd.stdout) if cmd.stdout.strip() else None


SEND = """
import json, smtplib, ssl, sys
host, port, sender, rcpt, msgid, tls_name, tls_ca = sys.argv[1:8]
out = {}
with smtplib.SMTP(timeout=30) as s:
    out["banner"] = s.connect(host, int(port))[1].decode()
    out["ehlo"] = s.ehlo("client.molecule.test")[1].decode()
    if tls_name:
        # Verified against the deployed certificate: the one served is the role's.
        ctx = ssl.create_default_context(cafile=tls_ca)
        s._host = tls_name  # smtplib takes server_hostname from here
        out["starttls"] = s.starttls(context=ctx)[0]
        out["cipher"] = s.sock.version()
        s.ehlo("client.molecule.test")
    body = (f"From: <{sender}>\\r\\nTo: <{rcpt}>\\r\\nMessage-ID: <{msgid}>\\r\\n"
            "Subject: molecule\\r\\n\\r\\nhello\\r\\n")
    out["refused"] = s.sendmail(sender, [rcpt], body)
print(json.dumps(out))
"""


def send(host: Any, rcpt: str, msgid: str, *, sender: str = "sender@client.molecule.test",
         address: str = "127.0.0.1", port: int = 25, tls_name: str = "",
         tls_ca: str = "") -> dict[str, Any]:
    """One SMTP transaction; raises (probe fails) if the message is not accepted.
    With ``tls_name``: STARTTLS first, the server's certificate verified for that
    name against ``tls_ca``."""
    result: dict[str, Any] = py(host, SEND, address, str(port), sender, rcpt, msgid,
                                tls_name, tls_ca)
    return result


BANNER = """
import json, socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as s:
    print(json.dumps(s.makefile("rb").readline().decode().strip()))
"""


def banner(host: Any, address: str = "127.0.0.1", port: int = 25) -> str:
    result: str = py(host, BANNER, address, str(port))
    return result


WAIT_DELIVERED = """
import json, os, sys, time
maildir, msgid, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
deadline = time.monotonic() + timeout
while True:
    for sub in ("new", "cur"):
        d = os.path.join(maildir, sub)
        for name in (os.listdir(d) if os.path.isdir(d) else []):
            with open(os.path.join(d, name), "rb") as f:
                text = f.read().decode(errors="replace")
            if f"<{msgid}>" in text:
                print(json.dumps({"file": os.path.join(d, name), "text": text,
                                  "mtime": os.stat(os.path.join(d, name)).st_mtime}))
                sys.exit(0)
    if time.monotonic() > deadline:
        print(json.dumps(None))
        sys.exit(0)
    time.sleep(0.5)
"""


def delivered(host: Any, msgid: str, timeout: float = 90.0) -> dict[str, Any] | None:
    """The sink's copy of message ``msgid`` (waiting up to ``timeout``), or None."""
    result: dict[str, Any] | None = py(host, WAIT_DELIVERED, SINK_MAILDIR, msgid,
                                       str(timeout))
    return result


HTTP = """
import json, sys, urllib.error, urllib.request
url, token = sys.argv[1], sys.argv[2]
req = urllib.request.Request(url)
if token:
    req.add_header("Authorization", f"Bearer {token}")
try:
    with urllib.request.urlopen(req, timeout=30) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode(errors="replace")}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode(errors="replace")}))
"""


def http_get(host: Any, url: str, token: str = "") -> dict[str, Any]:
    result: dict[str, Any] = py(host, HTTP, url, token)
    return result


def unit(host: Any, name: str, *props: str) -> dict[str, str]:
    """``systemctl show`` properties of unit ``name``."""
    out = host.check_output("systemctl show %s " + " ".join(f"-p {p}" for p in props), name)
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
