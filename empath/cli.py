"""The ``empath`` command: run the daemon, check a config file, set submission
passwords (``passwd``), make DKIM keys (``dkim-keygen``), print the version, and be
``sendmail``, ``mailq`` and ``newaliases`` when called by those names (the package
installs them as symlinks to ``empath``; see empath.sendmail)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import empath

__all__ = ["main"]

EXIT_CONFIG = 2


def _config_path(arg: str | None) -> Path:
    from empath.config import default_config_path

    return Path(arg) if arg else default_config_path()


def cmd_run(args: argparse.Namespace) -> int:
    from empath.daemon import run

    return run(_config_path(args.config))


def cmd_check_config(args: argparse.Namespace) -> int:
    from empath.config import ConfigError, dump_config, load_config

    path = _config_path(args.config)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    try:
        print(f"# {path}: configuration is valid; effective configuration follows")
        print(dump_config(cfg), end="")
        sys.stdout.flush()
    except BrokenPipeError:
        # `empath check-config | head`: the reader has what it wanted; the verdict is
        # the exit status. Point stdout at /dev/null so the exit flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"empath {empath.__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="empath", description="empath mail transfer agent")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "configuration file (default: $EMPATH_CONFIG, else /etc/empath/empath.yaml)"
    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("--config", "-c", help=config_help)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check-config", help="validate a configuration file and print it")
    p.add_argument("--config", "-c", help=config_help)
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    from empath.dkimkeygen import add_parser as add_dkim_keygen

    add_dkim_keygen(sub)
    # Listed for --help only: main() hands ``sendmail`` its arguments untouched, since
    # sendmail's options (-t, -oi, -fADDR) are not argparse's.
    sub.add_parser("sendmail", add_help=False,
                   help="sendmail-compatible local submission (empath sendmail --help)")
    from empath.passwd import add_arguments as add_passwd_arguments

    add_passwd_arguments(sub.add_parser(
        "passwd", help="set or delete a submission password (submission.users_file)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        # /usr/sbin/sendmail, /usr/bin/mailq, /usr/bin/newaliases → /usr/bin/empath
        name = os.path.basename(sys.argv[0])
        if name in ("sendmail", "mailq", "newaliases"):
            from empath.sendmail import run_as

            return run_as(name, sys.argv[1:])
        argv = sys.argv[1:]
    if argv[:1] == ["sendmail"]:
        from empath.sendmail import main as sendmail_main

        return sendmail_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
