"""empath under a real systemd (Debian 12, systemd 252, booted in a container).

Numbered scenarios; SMTP goes from the host to 127.0.0.1:25 / [::1]:25, which is the
container's empath.socket (the container shares the host's network). Each test starts
from the state the ``empath`` fixture resets to: base configuration, empty spool and
mailboxes, no drop-ins, empath.socket listening, empath.service started (or stopped
for scenario 1).
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.system import smtp
from tests.system.conftest import Empath, config_text

pytestmark = pytest.mark.system

SUPERVISOR_CMDLINE = "/usr/bin/python3 /usr/bin/empath run --config /etc/empath/empath.yaml"


def cmdline(e: Empath, pid: int) -> str:
    raw = e.c.run(["cat", f"/proc/{pid}/cmdline"]).stdout
    return raw.replace("\0", " ").strip()


def wait_for(predicate, timeout: float, what: str, e: Empath | None = None):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = ("\n" + e.journal(lines=60)) if e is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(0.2)


# ---- 1. socket activation ---------------------------------------------------------


def test_1_first_connection_starts_the_service(empath: Empath) -> None:
    """With only empath.socket up, the first SMTP connection starts empath.service and
    gets its 220 banner; the service is then active, its MainPID the supervisor."""
    empath.reset(start=False)
    assert empath.state("empath.service") == "inactive"
    assert empath.state("empath.socket") == "active"

    greeting = smtp.banner(timeout=30)
    assert greeting.startswith("220 "), greeting
    assert "mx.system.test" in greeting, greeting

    out = smtp.run(smtp.session("user@system.test", "activated"))
    assert out.accepted, out
    empath.wait_state("active", timeout=30)

    pid = empath.main_pid()
    assert pid > 0
    assert cmdline(empath, pid) == SUPERVISOR_CMDLINE
    # The workers are the supervisor's children; systemd watches the supervisor.
    workers = empath.children(pid)
    assert len(workers) == 2, workers
    for w in workers:
        assert "empath.daemon.worker" in cmdline(empath, w)


# ---- 2. reload ----------------------------------------------------------------------


def test_2_reload_under_load_drops_nothing_and_applies_the_change(empath: Empath) -> None:
    """``systemctl reload empath`` during 200 SMTP sessions drops none of them, makes a
    new local domain acceptable, keeps the MainPID; a broken config makes the reload
    fail and the old config keeps serving."""
    pid = empath.main_pid()
    # [::1] is not in relay_networks: new.test is refused until it becomes local.
    before = smtp.run(smtp.session("someone@new.test", "before", host=smtp.HOST6))
    assert (before.stage, before.code) == ("rcpt", 554), before

    load = smtp.Load(count=200, concurrency=2).start()
    try:
        load.wait_done(40)
        empath.write_config(config_text(domains=("system.test", "new.test")))
        r = empath.c.systemctl("reload", "empath.service", check=False)
        assert r.returncode == 0, \
            f"systemctl reload failed:\n{r.stderr}\n{empath.journal(lines=15)}"
        after = smtp.run(smtp.session("someone@new.test", "after", host=smtp.HOST6))
        assert after.accepted, after
    finally:
        outcomes = load.join()
    assert len(outcomes) == 200
    failed = [o for o in outcomes if not o.accepted]
    assert not failed, f"{len(failed)} of 200 sessions failed during the reload: {failed[:5]}"
    assert empath.main_pid() == pid
    assert empath.state() == "active"

    # A broken configuration: reload fails, nothing changes.
    empath.write_config(config_text(domains=("system.test", "new.test"),
                                    extra="no_such_key: 1\n"))
    r = empath.c.systemctl("reload", "empath.service", check=False)
    assert r.returncode != 0, "systemctl reload succeeded with a broken configuration"
    assert empath.state() == "active"
    assert empath.main_pid() == pid
    still = smtp.run(smtp.session("someone@new.test", "old config kept", host=smtp.HOST6))
    assert still.accepted, still
    assert "no_such_key" in empath.journal(lines=40)


# ---- 3. stop under load -------------------------------------------------------------


def test_3_stop_under_load_loses_no_acknowledged_message(empath: Empath) -> None:
    """``systemctl stop empath`` while clients are sending: every message that got its
    250 is in the spool afterwards, including one that was inside DATA when the stop
    began (KillMode=mixed lets the supervisor finish it)."""
    empath.reset(config=config_text(mode="hold"))
    load = smtp.Load(concurrency=4).start()
    try:
        load.wait_done(30)
    except BaseException:
        load.stop()
        load.join()
        raise

    def stop_service() -> None:
        empath.c.systemctl("stop", "empath.service", timeout=120)

    async def slow_data_session() -> smtp.Outcome:
        stopping: asyncio.Future[None] | None = None

        async def pause() -> None:
            # Half the message is in: stop the service now, send the rest meanwhile.
            nonlocal stopping
            stopping = asyncio.get_running_loop().run_in_executor(None, stop_service)
            await asyncio.sleep(1.5)

        out = await smtp.session("user@system.test", "inside DATA at stop", during_data=pause)
        if stopping is not None:
            await stopping
        return out

    empath.mark()  # the journal checks below are about this stop
    in_data = asyncio.run(slow_data_session())
    load.stop()
    outcomes = load.join()
    # Connections made after the stop may have re-activated the service; stop both
    # units so that the spool is at rest when we read it.
    empath.c.systemctl("stop", "empath.socket", "empath.service", timeout=120)
    try:
        assert in_data.accepted, f"the session inside DATA at stop was not accepted: {in_data}"
        acked = {o.queue_id for o in [*outcomes, in_data] if o.accepted and o.queue_id}
        assert len(acked) >= 30
        files = empath.queue_files()
        missing = sorted(i for i in acked if f"{i}.msg" not in files)
        assert not missing, f"{len(missing)} acknowledged messages are not in the spool: " \
                            f"{missing[:10]}"
        stop_log = empath.journal()
        assert "Deactivated successfully" in stop_log, stop_log[-3000:]
        assert "SIGKILL" not in stop_log and "timed out" not in stop_log, stop_log[-3000:]
    finally:
        empath.c.systemctl("start", "empath.socket")


# ---- 4. watchdog --------------------------------------------------------------------

WATCHDOG_DROPIN = "[Service]\nWatchdogSec=3s\n"


def test_4_watchdog_restarts_a_stopped_daemon(empath: Empath) -> None:
    """With WatchdogSec=3s, a healthy daemon keeps pinging (no restart in 8 s); a
    SIGSTOPped one is killed and restarted by systemd, with a new MainPID, and serves."""
    empath.drop_in("50-watchdog.conf", WATCHDOG_DROPIN)
    empath.c.systemctl("restart", "empath.service", timeout=120)
    empath.wait_state("active")
    assert empath.prop("WatchdogUSec") in ("3s", "3000000")
    pid = empath.main_pid()
    time.sleep(8)  # more than twice WatchdogSec: only pings keep it alive
    assert empath.main_pid() == pid, "restarted although not stopped: no WATCHDOG=1 pings?\n" \
                                     + empath.journal(lines=30)
    assert empath.prop("NRestarts") == "0"

    empath.c.sh(f"kill -STOP {pid}")  # the shell's kill: minbase has no procps
    new = wait_for(lambda: (p := empath.main_pid()) not in (0, pid) and
                   empath.state() == "active" and p, 45, "a restarted empath.service", empath)
    assert new != pid
    assert int(empath.prop("NRestarts")) >= 1
    assert "Watchdog timeout" in empath.journal(lines=80)
    out = smtp.run(smtp.session("user@system.test", "after watchdog restart"))
    assert out.accepted, out


# ---- 5. journald ----------------------------------------------------------------------


def test_5_journal_shows_one_messages_life_by_queue_id(empath: Empath) -> None:
    """``journalctl -u empath QUEUE_ID=<id>`` returns the message's received and
    delivered events (maildir route inside the container)."""
    out = smtp.run(smtp.session("user@system.test", "journal"))
    assert out.accepted, out
    qid = out.queue_id
    assert qid
    wait_for(lambda: empath.mailbox("user"), 30, "delivery to the maildir", empath)

    def events() -> list[dict[str, str]]:
        text = empath.journal(f"QUEUE_ID={qid}", output="json", everything=True)
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    entries = wait_for(lambda: (ev := events()) and
                       {"received", "delivered"} <= {x.get("EMPATH_EVENT") for x in ev} and ev,
                       15, f"received and delivered events for {qid}", empath)
    assert all(x.get("QUEUE_ID") == qid for x in entries)
    by_event = {x["EMPATH_EVENT"]: x for x in entries if "EMPATH_EVENT" in x}
    assert by_event["received"].get("CLIENT_ADDR", "").endswith("127.0.0.1")
    assert by_event["received"].get("_SYSTEMD_UNIT") == "empath.service"
    assert qid in by_event["delivered"].get("MESSAGE", "")


# ---- 6. hardening -------------------------------------------------------------------


def test_6_service_runs_unprivileged_and_sandboxed(empath: Empath) -> None:
    """The daemon runs as user empath with no capabilities and NoNewPrivs, under a
    seccomp filter, on a read-only root with its state directory writable."""
    uid = empath.c.run(["id", "-u", "empath"]).stdout.strip()
    admin_gid = empath.c.run(["getent", "group", "empath-admin"]).stdout.split(":")[2]
    pid = empath.main_pid()
    for p in [pid, *empath.children(pid)]:
        st = empath.proc_status(p)
        assert st["Uid"].split() == [uid] * 4, (p, st["Uid"])
        assert admin_gid in st["Groups"].split(), (p, st["Groups"])
        for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(st[cap], 16) == 0, (p, cap, st[cap])
        assert st["NoNewPrivs"] == "1", p
        assert st["Seccomp"] == "2", p
    mounts = empath.c.run(["cat", f"/proc/{pid}/mountinfo"]).stdout.splitlines()

    def options(mountpoint: str) -> list[str]:
        found = [ln.split() for ln in mounts if ln.split()[4] == mountpoint]
        assert found, f"{mountpoint} is not a mount point in the service's namespace"
        return found[-1][5].split(",")

    assert "ro" in options("/")
    assert "rw" in options("/var/lib/empath")
    assert "rw" in options("/run/empath")
    # Directory modes from the unit (StateDirectoryMode / RuntimeDirectoryMode).
    modes = empath.c.run(["stat", "-c", "%a %U %G", "/var/lib/empath", "/run/empath"]).stdout
    assert modes.splitlines() == ["750 empath empath", "755 empath empath"], modes


# ---- 7. control socket ----------------------------------------------------------------


def test_7_control_socket_is_for_empath_admin_only(empath: Empath) -> None:
    """/run/empath/control.sock is 0660 empath:empath-admin: a member of empath-admin
    can run ``empathctl status``, another user cannot."""
    c = empath.c
    c.sh("id alice >/dev/null 2>&1 || useradd -M -G empath-admin alice; "
         "id bob >/dev/null 2>&1 || useradd -M bob")
    st = wait_for(lambda: c.run(["stat", "-c", "%a %U %G %F", "/run/empath/control.sock"],
                                check=False).stdout.strip(), 10, "the control socket", empath)
    assert st == "660 empath empath-admin socket", st
    ok = c.run(["runuser", "-u", "alice", "--", "empathctl", "status"], check=False)
    assert ok.returncode == 0, ok.stderr
    denied = c.run(["runuser", "-u", "bob", "--", "empathctl", "status"], check=False)
    assert denied.returncode != 0


# ---- 8. delivery out of the sandbox ---------------------------------------------------


def test_8_delivers_over_smtp_from_inside_the_sandbox(empath: Empath) -> None:
    """A message relayed for a client in relay_networks leaves the sandboxed service
    over SMTP (RestrictAddressFamilies=, the system call filter, no capabilities) and
    reaches a sink on the host's loopback."""
    from tests.sinks import SMTPSink

    async def go() -> None:
        async with SMTPSink(host="127.0.0.61") as sink:
            empath.reset(config=config_text(
                routes={"remote.test": f"smtp:{sink.host}:{sink.port}"}))
            out = await smtp.session("someone@remote.test", "out of the sandbox")
            assert out.accepted, out
            deadline = time.monotonic() + 30
            while not sink.delivered:
                assert time.monotonic() < deadline, "not delivered to the sink in 30 s\n" \
                    + empath.journal(lines=20)
                await asyncio.sleep(0.2)
            t = sink.delivered[0]
            assert t.rcpts[0].startswith("TO:<someone@remote.test>"), t.rcpts
            assert t.data is not None and b"Subject: out of the sandbox" in t.data

    asyncio.run(go())


# ---- 9. submission socket -------------------------------------------------------------


def test_9_enabling_the_submission_socket_as_documented(empath: Empath) -> None:
    """empath-submission.socket ships disabled; the sequence its comment documents
    (stop the service, enable --now the socket, start the service) hands the service
    both sockets, named smtp and submission, and port 587 greets."""
    c = empath.c
    assert c.systemctl("is-enabled", "empath-submission.socket", check=False).stdout.strip() \
        == "disabled"
    assert nspawn_port_refused(587)
    c.systemctl("stop", "empath.service")
    c.systemctl("enable", "--now", "empath-submission.socket")
    c.systemctl("start", "empath.service")
    empath.wait_state("active")
    environ = c.run(["cat", f"/proc/{empath.main_pid()}/environ"]).stdout.split("\0")
    names = next(v.partition("=")[2] for v in environ if v.startswith("LISTEN_FDNAMES="))
    assert sorted(names.split(":")) == ["smtp", "submission"], names
    assert smtp.banner(port=587).startswith("220 ")
    assert smtp.banner(port=25).startswith("220 ")


def nspawn_port_refused(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) != 0


# ---- 10. configuration error at start ----------------------------------------------------


def test_10_config_error_at_start_is_not_restarted(empath: Empath) -> None:
    """A broken configuration at start exits with status 2 and RestartPreventExitStatus=2
    keeps systemd from restarting it in a loop; fixed, the service starts again."""
    empath.write_config(config_text(extra="no_such_key: 1\n"))
    r = empath.c.systemctl("restart", "empath.service", check=False)
    assert r.returncode != 0
    time.sleep(4)  # twice RestartSec=2s
    assert empath.state() == "failed"
    assert empath.prop("ExecMainStatus") == "2"
    assert empath.prop("NRestarts") == "0"
    assert "no_such_key" in empath.journal(lines=20)
    empath.write_config(config_text())
    empath.c.systemctl("reset-failed", "empath.service")
    empath.c.systemctl("start", "empath.service")
    empath.wait_state("active")
    assert smtp.banner().startswith("220 ")
