"""``empath dkim-keygen DOMAIN SELECTOR``: a new DKIM key and the DNS record to publish.

The private key (RSA, PKCS#1 PEM, which every dkimpy version and OpenDKIM read) is
written to a new file, mode 0640 and group ``empath`` when that group exists, so the
daemon (``User=empath``) can read it and nobody else can. An existing file is never
overwritten: rotation means a new selector and a new file, while the old key stays
published until mail signed with it has been read (docs/dkim.md).

stdout gets the one line to add to DOMAIN's zone, nothing else, so it can be
redirected; where the key went and the config to add go to stderr.
"""

from __future__ import annotations

import argparse
import base64
import grp
import os
import sys
from pathlib import Path

from empath.addr import AddressError, normalize_domain

__all__ = ["DEFAULT_DIR", "generate", "main", "txt_record", "txt_strings", "write_key"]

DEFAULT_DIR = Path("/etc/empath/dkim")
BITS = (1024, 2048, 3072, 4096)
GROUP = "empath"
EXIT_USAGE = 2
EXIT_FAILED = 1
# RFC 1035 §3.3: a TXT record is a sequence of strings of at most 255 octets each.
MAX_TXT_STRING = 255


def generate(bits: int) -> tuple[bytes, str]:
    """(private key as PKCS#1 PEM, public key as base64 SubjectPublicKeyInfo: p=)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode("ascii")


def txt_strings(value: str) -> list[str]:
    """``value`` cut into TXT character-strings (DKIM verifiers concatenate them)."""
    return [value[i:i + MAX_TXT_STRING] for i in range(0, len(value), MAX_TXT_STRING)]


def txt_record(domain: str, selector: str, public_b64: str) -> str:
    """The zone-file line: ``s1._domainkey.example.com. IN TXT "v=DKIM1; ..." "..."``."""
    value = f"v=DKIM1; k=rsa; p={public_b64}"
    strings = " ".join(f'"{s}"' for s in txt_strings(value))
    return f"{selector}._domainkey.{domain}. IN TXT {strings}"


def _group_id() -> int | None:
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return None


def write_key(path: Path, pem: bytes) -> str:
    """Create ``path`` (never replacing a file) with mode 0640; returns its group."""
    gid = _group_id()
    parent = path.parent
    if not parent.exists():
        # The directory only needs to be searchable by the daemon's group.
        parent.mkdir(mode=0o750)
        if gid is not None and os.geteuid() == 0:
            os.chown(parent, -1, gid)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        if gid is not None:
            try:
                os.fchown(fd, -1, gid)
            except PermissionError:
                gid = None  # not root and not a member: the operator fixes the group
        os.fchmod(fd, 0o640)  # whatever the umask
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return GROUP if gid is not None else grp.getgrgid(os.stat(path).st_gid).gr_name


def _name(value: str, what: str) -> str:
    try:
        return normalize_domain(value)
    except AddressError as exc:
        raise ValueError(f"{what}: {exc}") from None


def main(args: argparse.Namespace) -> int:
    err = sys.stderr
    try:
        domain = _name(args.domain, "domain")
        selector = _name(args.selector, "selector")
    except ValueError as exc:
        print(f"empath dkim-keygen: {exc}", file=err)
        return EXIT_USAGE
    path = Path(args.out) if args.out else DEFAULT_DIR / f"{domain}.{selector}.key"
    if path.exists() or path.is_symlink():
        print(f"empath dkim-keygen: {path} exists; a new key needs a new selector and a "
              "new file (see docs/dkim.md on rotation), or remove it first", file=err)
        return EXIT_FAILED
    try:
        pem, public = generate(args.bits)
    except ImportError:
        print("empath dkim-keygen: needs the Python package 'cryptography' "
              "(Debian: python3-cryptography)", file=err)
        return EXIT_FAILED
    try:
        group = write_key(path, pem)
    except OSError as exc:
        print(f"empath dkim-keygen: cannot write {path}: {exc.strerror or exc}", file=err)
        return EXIT_FAILED
    print(txt_record(domain, selector, public))
    print(f"# wrote the {args.bits}-bit private key to {path} (mode 0640, group {group})",
          file=err)
    if group != GROUP:
        print(f"# the daemon's user must be able to read it: chgrp {GROUP} {path}", file=err)
    print(f"# publish the TXT record above in the {domain} zone (a web form wants the "
          f"value without quotes: v=DKIM1; k=rsa; p=...),\n# check it with: "
          f"dig +short TXT {selector}._domainkey.{domain}\n"
          f"# then add to /etc/empath/empath.yaml and run systemctl reload empath:\n"
          f"#   dkim:\n#     {domain}: {{selector: {selector}, key: {path}}}", file=err)
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dkim-keygen", help="generate a DKIM key and print its DNS record",
                       description="Generate an RSA key for DKIM signing and print the "
                       "TXT record to publish for it.")
    p.add_argument("domain", metavar="DOMAIN", help="signing domain (d=), e.g. example.com")
    p.add_argument("selector", metavar="SELECTOR", help="selector (s=), e.g. s1 or 2025a")
    p.add_argument("--bits", type=int, choices=BITS, default=2048,
                   help="RSA key size (default 2048)")
    p.add_argument("--out", metavar="FILE",
                   help=f"private key file to create (default {DEFAULT_DIR}/DOMAIN.SELECTOR.key)")
    p.set_defaults(func=main)
