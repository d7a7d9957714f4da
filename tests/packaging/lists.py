"""What the built packages contain, in the normalised form kept in tests/packaging/.

``files.txt`` is ONE list for both packages: every file and symlink of the .deb
(``dpkg-deb -c``) and of the .rpm (``rpm -qpl``, with modes and link targets), with
the distribution-specific parts written as placeholders:

    {sitelib}   /usr/lib/python3/dist-packages (deb), /usr/lib/python3.13/site-packages (rpm)
    {version}   the package version
    {modules}   one line standing for every .py file under empath/ in this checkout

A line starting with ``deb `` or ``rpm `` is in that package only (the packaging
metadata of its distribution). Directories are not listed.

``python3 -m tests.packaging.lists`` prints the lists of a fresh build;
``... --update`` rewrites the kept files from it (review the diff before committing).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.packaging.build import REPO, Built, built

HERE = Path(__file__).resolve().parent
FILES = HERE / "files.txt"
RPM_REQUIRES = HERE / "rpm-requires.txt"
RPM_SCRIPTS = HERE / "rpm-scripts.txt"
DEB_CONTROL = HERE / "deb-control.txt"

SITELIB = {"deb": "/usr/lib/python3/dist-packages", "rpm": "/usr/lib/python3.13/site-packages"}
MODULES = "{modules}"
DEB_FIELDS = ("Depends", "Pre-Depends", "Recommends", "Provides", "Conflicts", "Replaces",
              "Breaks", "Architecture", "Section", "Priority")


def _out(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def deb_entries(deb: Path) -> list[tuple[str, str, str]]:
    """(permissions, path, link target or "") of every non-directory in the .deb."""
    entries = []
    for line in _out(["dpkg-deb", "-c", str(deb)]).splitlines():
        fields = line.split(None, 5)
        perms, name = fields[0], fields[5]
        if perms.startswith("d"):
            continue
        target = ""
        if " -> " in name:
            name, target = name.split(" -> ", 1)
        entries.append((perms, name.removeprefix("."), target))
    return entries


def rpm_entries(rpm: Path) -> list[tuple[str, str, str]]:
    qf = "[%{FILEMODES:perms}\\t%{FILENAMES}\\t%{FILELINKTOS}\\n]"
    entries = []
    for line in _out(["rpm", "-qp", "--qf", qf, str(rpm)]).splitlines():
        perms, name, target = line.split("\t")
        if not perms.startswith("d"):
            entries.append((perms, name, target))
    return entries


def module_files() -> list[str]:
    """Every .py file of the empath package in this checkout, relative to empath/."""
    root = REPO / "empath"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                  if "__pycache__" not in p.parts)


def normalise(entries: list[tuple[str, str, str]], flavour: str, version: str) -> list[str]:
    """Lines as in files.txt; the modules of this checkout collapse into {modules}."""
    sitelib = SITELIB[flavour]
    modules = {f"{sitelib}/empath/{m}" for m in module_files()}
    lines, seen_modules = set(), set()
    for perms, name, target in entries:
        if name in modules and perms == "-rw-r--r--" and not target:
            seen_modules.add(name)
            continue
        name = name.replace(sitelib, "{sitelib}").replace(f"-{version}.", "-{version}.")
        lines.add(f"{perms} {name}" + (f" -> {target}" if target else ""))
    if seen_modules == modules:
        lines.add(f"-rw-r--r-- {{sitelib}}/empath/{MODULES}")
    else:
        for m in sorted(modules - seen_modules):
            lines.add(f"MISSING {m.replace(sitelib, '{sitelib}')}")
    return sorted(lines)


def expected(flavour: str) -> list[str]:
    """files.txt's lines that apply to ``flavour`` (prefix removed)."""
    lines = []
    for raw in FILES.read_text().splitlines():
        if not raw.strip() or raw.startswith("#"):
            continue
        tag, _, rest = raw.partition(" ")
        if tag in ("deb", "rpm"):
            if tag == flavour:
                lines.append(rest)
        else:
            lines.append(raw)
    return sorted(lines)


def rpm_requires(rpm: Path) -> list[str]:
    return sorted(set(_out(["rpm", "-qpR", str(rpm)]).splitlines()))


def rpm_scripts(rpm: Path) -> str:
    return _out(["rpm", "-qp", "--scripts", str(rpm)])


def deb_control(deb: Path) -> list[str]:
    lines = []
    for field in DEB_FIELDS:
        value = _out(["dpkg-deb", "-f", str(deb), field]).strip()
        if value:
            lines.append(f"{field}: {value}")
    return lines


def deb_conffiles(deb: Path) -> list[str]:
    r = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True,
                       text=True, check=False)
    return r.stdout.split()


def current(b: Built) -> dict[str, str]:
    assert b.rpm is not None
    deb = normalise(deb_entries(b.deb), "deb", b.version)
    rpm = normalise(rpm_entries(b.rpm), "rpm", b.version)
    common = sorted(set(deb) & set(rpm))
    files = [*common, *(f"deb {x}" for x in deb if x not in rpm),
             *(f"rpm {x}" for x in rpm if x not in deb)]
    return {"files": "\n".join(files) + "\n",
            "rpm-requires": "\n".join(rpm_requires(b.rpm)) + "\n",
            "rpm-scripts": rpm_scripts(b.rpm),
            "deb-control": "\n".join(deb_control(b.deb)) + "\n"}


def main(argv: list[str]) -> int:
    now = current(built())
    if argv[:1] != ["--update"]:
        for name, text in now.items():
            print(f"==== {name}\n{text}", end="")
        return 0
    header = "".join(line + "\n" for line in FILES.read_text().splitlines()
                     if line.startswith("#")) if FILES.exists() else ""
    FILES.write_text(header + now["files"])
    RPM_REQUIRES.write_text(now["rpm-requires"])
    RPM_SCRIPTS.write_text(now["rpm-scripts"])
    DEB_CONTROL.write_text(now["deb-control"])
    print(f"updated {FILES.parent}; review with git diff", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
