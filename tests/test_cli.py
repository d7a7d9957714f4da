"""The command-line surface: ``empath check-config``, ``version``, ``run`` on the
embedded default, and ``passwd`` without a users file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import empath
from tests.harness import (
    REPO,
    base_config,
    free_port,
    queued_id,
    record_swaks,
    send_message,
    spool_data,
    strip_received,
)

BIN = Path(sys.executable).parent


def command(name: str) -> list[str]:
    """The installed console script if there is one, else the module it runs."""
    script = BIN / name
    if script.exists():
        return [str(script)]
    module = {"empath": "empath", "empathctl": "empath.ctl"}[name]
    return [sys.executable, "-m", module]


def run(name: str, *args: str, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env.pop("EMPATH_CONFIG", None)
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run([*command(name), *args], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=60, check=False)


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def effective(stdout: str) -> dict[str, Any]:
    data = yaml.safe_load(stdout)
    assert isinstance(data, dict), stdout
    return data


def valid_config(tmp_path: Path) -> dict[str, Any]:
    return base_config(tmp_path / "state", 2525, 2587)


# ---- check-config --------------------------------------------------------------------


def test_check_config_prints_effective_config(tmp_path: Path) -> None:
    path = write(tmp_path / "empath.yaml", valid_config(tmp_path))
    p = run("empath", "check-config", "--config", str(path))
    assert p.returncode == 0, p.stderr
    cfg = effective(p.stdout)
    assert cfg["hostname"] == "mx.test.example"
    assert cfg["state_dir"] == str(tmp_path / "state")
    assert [x["address"] for x in cfg["listen"]] == ["127.0.0.1:2525", "127.0.0.1:2587"]
    # Defaults are filled in: this is what the daemon would actually do.
    assert cfg["limits"]["max_message_size"] == 26214400
    assert cfg["limits"]["max_recipients"] == 100
    assert cfg["delivery"]["mode"] == "hold"
    # Only a check: nothing was created.
    assert not (tmp_path / "state").exists()
    # The printed configuration is itself a valid configuration.
    again = tmp_path / "effective.yaml"
    again.write_text(p.stdout)
    p2 = run("empath", "check-config", "--config", str(again))
    assert p2.returncode == 0, p2.stderr
    assert effective(p2.stdout) == cfg


def test_check_config_lists_every_error_with_key_paths(tmp_path: Path) -> None:
    cfg = valid_config(tmp_path)
    cfg["limits"] = {"max_recipients": "many", "max_mesage_size": 10}
    cfg["relay_networks"] = ["127.0.0.0/8", "300.1.2.0/24"]
    cfg["listen"] = [{"address": "127.0.0.1:99999", "role": "smtp"}]
    cfg["colour"] = "blue"
    cfg["dkim"] = {"example.com": {"selector": "s1", "key": "relative/dkim.key"}}
    path = write(tmp_path / "bad.yaml", cfg)
    p = run("empath", "check-config", "--config", str(path))
    assert p.returncode != 0
    assert p.stdout == "", "an invalid config must not be printed as effective"
    errors = p.stderr
    for key in ("limits.max_recipients", "limits.max_mesage_size", "relay_networks[1]",
                "listen[0].address", "colour", "dkim"):
        lines = [line for line in errors.splitlines() if key in line]
        assert lines, f"no error names {key}:\n{errors}"
        assert all(str(path) in line for line in lines), lines
    assert "Traceback" not in errors


def test_check_config_needs_no_ownership_or_runtime_checks(tmp_path: Path) -> None:
    """As Ansible's validate= does: a root-only temporary copy, naming a state_dir that
    does not exist on this host and ports that may be taken."""
    private = tmp_path / "ansible-tmp"
    private.mkdir(mode=0o700)
    cfg = valid_config(tmp_path)
    cfg["state_dir"] = "/var/lib/empath-check-config-test/nowhere"
    cfg["listen"] = [{"address": "127.0.0.1:25", "role": "smtp"}]
    path = write(private / "tmpXYZ.yaml", cfg)
    os.chmod(path, 0o600)
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)  # owned by somebody else: still just a file to read
    p = run("empath", "check-config", "--config", str(path))
    assert p.returncode == 0, p.stderr
    assert effective(p.stdout)["state_dir"] == "/var/lib/empath-check-config-test/nowhere"
    assert not os.path.exists("/var/lib/empath-check-config-test")


def test_check_config_refuses_missing_or_unreadable_file(tmp_path: Path) -> None:
    p = run("empath", "check-config", "--config", str(tmp_path / "absent.yaml"))
    assert p.returncode != 0
    assert str(tmp_path / "absent.yaml") in p.stderr
    assert "Traceback" not in p.stderr


def test_empath_config_environment_variable(tmp_path: Path) -> None:
    good = write(tmp_path / "from-env.yaml", valid_config(tmp_path))
    p = run("empath", "check-config", env={"EMPATH_CONFIG": str(good)})
    assert p.returncode == 0, p.stderr
    assert str(good) in p.stdout
    assert effective(p.stdout)["hostname"] == "mx.test.example"

    cfg = valid_config(tmp_path)
    cfg["limits"] = {"max_errors": -1}
    bad = write(tmp_path / "bad-from-env.yaml", cfg)
    p = run("empath", "check-config", env={"EMPATH_CONFIG": str(bad)})
    assert p.returncode != 0
    assert f"{bad}: limits.max_errors" in p.stderr

    # --config wins over the environment.
    p = run("empath", "check-config", "--config", str(good), env={"EMPATH_CONFIG": str(bad)})
    assert p.returncode == 0, p.stderr


# ---- version and passwd ----------------------------------------------------------------


def test_version() -> None:
    p = run("empath", "version")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"empath {empath.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", empath.__version__)


def test_passwd_needs_a_users_file(tmp_path: Path) -> None:
    """``empath passwd`` is built (tests/test_submission.py); without
    submission.users_file in the config it says which key to set."""
    path = write(tmp_path / "e.yaml", valid_config(tmp_path))
    p = run("empath", "passwd", "--config", str(path), "--stdin", "alice")
    assert p.returncode == 2
    assert "submission.users_file is not set" in p.stderr
    assert "not supported yet" not in p.stderr and "Traceback" not in p.stderr


def test_no_command_is_a_usage_error() -> None:
    p = run("empath")
    assert p.returncode == 2
    assert "usage" in p.stderr.lower()


# ---- empath run on the embedded default ---------------------------------------------------


def test_run_with_examples_dev_yaml(tmp_path: Path) -> None:
    """The example config, copied with free ports: listens on loopback, keeps its spool
    next to the file (state_dir is relative to it, not to the working directory)."""
    src = REPO / "examples" / "dev.yaml"
    text = src.read_text()
    smtp, sub = free_port(), free_port()
    assert "127.0.0.1:2525" in text and "127.0.0.1:2587" in text
    text = text.replace("127.0.0.1:2525", f"127.0.0.1:{smtp}")
    text = text.replace("127.0.0.1:2587", f"127.0.0.1:{sub}")
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    os.chmod(conf_dir, 0o755)
    cfg_path = conf_dir / "dev.yaml"
    cfg_path.write_text(text)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    repo_state = REPO / "examples" / "dev-state"
    before = sorted(p.name for p in repo_state.rglob("*")) if repo_state.exists() else None

    env = dict(os.environ)
    env.pop("EMPATH_CONFIG", None)
    env["PYTHONPATH"] = str(REPO)
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "empath", "run", "--config", str(cfg_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=elsewhere,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while "ready: empath" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        body = b"Subject: dev\r\n\r\nhello from the example config\r\n"
        code, text = asyncio.run(send_message(smtp, "me@localhost", ["you@localhost"], body,
                                              "dev.yaml"))
        assert code == 250, text
        qid = queued_id(text)
        queued = spool_data(conf_dir / "dev-state" / "spool" / "queue", qid)
        assert strip_received(queued) == body
        assert not (elsewhere / "dev-state").exists()
        if shutil.which("swaks"):
            out = subprocess.run(
                ["swaks", "--server", f"127.0.0.1:{smtp}", "--to", "someone@localhost",
                 "--from", "me@localhost"], capture_output=True, text=True, timeout=30,
                check=False)
            assert out.returncode == 0, out.stdout + out.stderr
            assert any(r.startswith("250 2.0.0 Ok: queued as")
                       for r in record_swaks(out.stdout, "dev.yaml-swaks")), out.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Nothing was left in the repository.
    after = sorted(p.name for p in repo_state.rglob("*")) if repo_state.exists() else None
    assert after == before
