"""Tests for empath.statedir.validate_state_dir."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from empath.statedir import StateDirError, forbidden_location, validate_state_dir

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
NOBODY = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """A private parent directory (tmp_path's own mode depends on the pytest setup)."""
    d = tmp_path / "base"
    d.mkdir()
    os.chmod(d, 0o755)
    return d


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_creates_missing_dir_with_0750(base: Path, open_umask: None) -> None:
    target = base / "a" / "b" / "state"
    validate_state_dir(target)
    assert target.is_dir()
    assert mode_of(target) == 0o750
    # Parents we create are ordinary 0755 directories, whatever the umask.
    assert mode_of(base / "a") == 0o755
    assert mode_of(base / "a" / "b") == 0o755


def test_restrictive_umask_still_gives_0750(base: Path) -> None:
    old = os.umask(0o077)
    try:
        validate_state_dir(base / "state")
    finally:
        os.umask(old)
    assert mode_of(base / "state") == 0o750


def test_existing_good_dir_is_left_alone(base: Path) -> None:
    target = base / "state"
    target.mkdir(mode=0o700)
    os.chmod(target, 0o700)
    validate_state_dir(target)
    assert mode_of(target) == 0o700  # validation does not "fix" an acceptable mode


def test_idempotent(base: Path) -> None:
    validate_state_dir(base / "state")
    validate_state_dir(base / "state")


def test_relative_path_refused() -> None:
    with pytest.raises(StateDirError, match="must be an absolute path"):
        validate_state_dir(Path("relative/state"))


@pytest.mark.parametrize(
    "path",
    ["/", "/etc", "/etc/empath", "/usr/lib/empath", "/proc/self", "/sys/x", "/dev/shm/x",
     "/boot/x", "/bin/x", "/sbin/x", "/var", "/tmp", "/var/lib", "/etc/../usr/x"],
)  # fmt: skip
def test_system_locations_refused(path: str) -> None:
    with pytest.raises(StateDirError) as info:
        validate_state_dir(Path(path))
    assert path in str(info.value)
    assert not forbidden_location(Path("/var/lib/empath"))
    assert forbidden_location(Path(path))


def test_symlink_into_system_dir_refused_before_creating(base: Path) -> None:
    (base / "link").symlink_to("/etc")
    with pytest.raises(StateDirError, match=r"resolves to /etc/empath-test-.*system directory"):
        validate_state_dir(base / "link" / "empath-test-xyz")
    assert not os.path.lexists("/etc/empath-test-xyz")


def test_final_symlink_refused(base: Path) -> None:
    real = base / "real"
    real.mkdir(mode=0o750)
    link = base / "state"
    link.symlink_to(real)
    with pytest.raises(StateDirError, match="is a symlink"):
        validate_state_dir(link)


def test_dangling_symlink_refused_not_followed(base: Path) -> None:
    link = base / "state"
    link.symlink_to(base / "elsewhere")
    with pytest.raises(StateDirError, match="is a symlink"):
        validate_state_dir(link)
    assert not (base / "elsewhere").exists()


def test_safe_symlinked_parent_is_accepted(base: Path) -> None:
    """Admins move /var/lib/x to a bigger disk with a symlinked parent; that is fine
    as long as nobody else can change the directories involved."""
    (base / "disk").mkdir(mode=0o755)
    (base / "alias").symlink_to(base / "disk")
    validate_state_dir(base / "alias" / "state")
    assert (base / "disk" / "state").is_dir()


def test_not_a_directory(base: Path) -> None:
    f = base / "state"
    f.write_text("")
    with pytest.raises(StateDirError, match="not a directory"):
        validate_state_dir(f)


@pytest.mark.parametrize("mode", [0o770, 0o757, 0o777, 0o1777])
def test_group_or_world_writable_refused(base: Path, mode: int) -> None:
    target = base / "state"
    target.mkdir()
    os.chmod(target, mode)
    with pytest.raises(StateDirError, match=r"writable by group or others; chmod 0750"):
        validate_state_dir(target)


def test_owner_without_access_refused(base: Path) -> None:
    target = base / "state"
    target.mkdir()
    os.chmod(target, 0o550)
    with pytest.raises(StateDirError, match="not rwx for its owner"):
        validate_state_dir(target)


def test_writable_parent_refused(base: Path) -> None:
    parent = base / "shared"
    parent.mkdir()
    os.chmod(parent, 0o777)
    with pytest.raises(StateDirError, match=f"parent directory {parent} has mode 0777"):
        validate_state_dir(parent / "state")
    assert not (parent / "state").exists()  # refused before creating anything


def test_sticky_world_writable_parent_ok(base: Path) -> None:
    parent = base / "tmpish"
    parent.mkdir()
    os.chmod(parent, 0o1777)
    validate_state_dir(parent / "state")


@root_only
def test_owned_by_another_user(base: Path) -> None:
    target = base / "state"
    target.mkdir(mode=0o750)
    os.chown(target, NOBODY, NOBODY)
    with pytest.raises(StateDirError, match=rf"is owned by .*{NOBODY}.*empath runs as"):
        validate_state_dir(target)


@root_only
def test_parent_owned_by_another_user(base: Path) -> None:
    parent = base / "theirs"
    parent.mkdir(mode=0o755)
    os.chown(parent, NOBODY, NOBODY)
    with pytest.raises(StateDirError, match=f"parent directory {parent} is owned by"):
        validate_state_dir(parent / "state")


def test_uncreatable(base: Path) -> None:
    blocker = base / "file"
    blocker.write_text("")
    with pytest.raises(StateDirError):
        validate_state_dir(blocker / "state")
