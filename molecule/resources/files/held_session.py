#!/usr/bin/python3
"""An SMTP session held open across a reload (the reload scenario's side effect).

    held_session.py DIR RCPT

Connects to 127.0.0.1:25, sends EHLO, MAIL and RCPT, writes DIR/ready.json (with
the banner), then waits for DIR/go to appear before it sends DATA and QUIT, and
writes DIR/result.json. Run as a transient unit, so it outlives the Ansible task
that started it.
"""

import json
import smtplib
import sys
import time
from pathlib import Path

MSGID = "held-session@reload.test"


def main() -> None:
    state, rcpt = Path(sys.argv[1]), sys.argv[2]
    state.mkdir(parents=True, exist_ok=True)
    s = smtplib.SMTP(timeout=280)
    _, banner = s.connect("127.0.0.1", 25)
    ehlo = s.ehlo("held.reload.test")[1].decode()
    s.mail("sender@held.reload.test")
    s.rcpt(rcpt)
    (state / "ready.json").write_text(json.dumps({"banner": banner.decode(), "ehlo": ehlo}))
    deadline = time.monotonic() + 250
    while not (state / "go").exists():
        if time.monotonic() > deadline:
            raise SystemExit("never told to go on")
        time.sleep(0.2)
    result: dict[str, object] = {"banner": banner.decode()}
    try:
        code, reply = s.data(f"From: <sender@held.reload.test>\r\nTo: <{rcpt}>\r\n"
                             f"Message-ID: <{MSGID}>\r\nSubject: held\r\n\r\nheld\r\n")
        result.update(data=code, reply=reply.decode())
        s.quit()
    except (OSError, smtplib.SMTPException) as exc:
        # A restart instead of a reload ends up here (421, or the connection gone).
        result["error"] = repr(exc)
    (state / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
