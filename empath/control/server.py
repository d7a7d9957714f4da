"""The control socket server (the daemon side of ``empathctl``).

Life cycle, driven by the supervisor::

    server = ControlServer(control_socket_path(config), handlers,
                           token_file=config.control.token_file)
    await server.start()          # ControlError if the socket cannot be set up
    ...
    server.set_token_file(new.control.token_file)   # at reload (ControlError if bad)
    ...
    await server.close()          # at shutdown: stops serving, removes the socket

Creating the socket is race-free: it is bound inside a fresh private (0700)
directory next to the final path, given mode 0660 and the admin group there
(nobody else can reach it yet), and then renamed over the final path. A stale
socket left by a crash is replaced atomically; nothing is ever unlinked and then
bound at a name someone else could take in between. A live socket at the path
(another daemon answering there) or a file that is not a socket is refused.

Each connection is checked with the peer's kernel credentials (see ``auth``);
reads are bounded (``MAX_REQUEST``) and timed out, and the number of concurrent
control connections is capped, so a misbehaving client cannot disturb the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

from empath.control.auth import (
    ControlError,
    Peer,
    authorize,
    check_token,
    peer_credentials,
    read_token,
)
from empath.control.commands import (
    COMMANDS,
    CommandContext,
    ControlHandlers,
    Stream,
    cancel_reloads,
)
from empath.control.protocol import (
    MAX_REQUEST,
    LineReader,
    LineTooLong,
    ProtocolError,
    encode_error,
    encode_result,
    parse_request,
)

__all__ = ["DEFAULT_ADMIN_GROUP", "ControlError", "ControlServer"]

log = logging.getLogger("empath.control")

DEFAULT_ADMIN_GROUP = "empath-admin"
SOCKET_MODE = 0o660
# Linux sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
MAX_CONNECTIONS = 16
# Seconds a client may take to send a request, and to read a response.
REQUEST_TIMEOUT = 30.0
# Test-only: overrides REQUEST_TIMEOUT when ControlServer gets no request_timeout,
# so a test against the real daemon can watch a slow client being cut off quickly.
TIMEOUT_ENV = "EMPATH_CONTROL_TIMEOUT"
# Seconds a client may take to read each line of a streamed answer (queue list paged
# through less(1), for instance); at least the request timeout.
STREAM_TIMEOUT = 600.0
# Over the cap, a client gets "busy" if it sends its request this fast.
BUSY_TIMEOUT = 2.0
# Connections over the cap that are answered "busy" at once; beyond, closed unanswered.
MAX_REJECTING = 16
BACKLOG = 64


class ControlServer:
    def __init__(
        self,
        path: Path,
        handlers: ControlHandlers,
        *,
        token_file: Path | None = None,
        admin_group: str = DEFAULT_ADMIN_GROUP,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float | None = None,
    ) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.admin_group = admin_group
        self.max_connections = max_connections
        # None: $EMPATH_CONTROL_TIMEOUT (test-only) if set and valid, else 30 s.
        self.request_timeout = (request_timeout if request_timeout is not None
                                else _timeout_from_env())
        self._token_file = token_file
        self._token: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._inode: tuple[int, int] | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._rejecting = 0  # connections being told "busy"
        self._tasks: set[asyncio.Task[Any]] = set()  # every connection, for close()
        self._closing = False
        self._daemon_uid = os.geteuid()

    # ---- life cycle ------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and serve. ControlError (with the reason) if impossible."""
        if self._server is not None:
            raise RuntimeError("control server already started")
        self.set_token_file(self._token_file)
        sock = await asyncio.to_thread(self._create_socket)
        try:
            self._server = await asyncio.start_unix_server(self._client, sock=sock)
        except BaseException:
            sock.close()
            self._unlink()
            raise

    def set_token_file(self, token_file: Path | None) -> None:
        """Use a (new) token file, or none; at reload. ControlError if unusable, and
        then the previous token stays in force."""
        token = read_token(token_file) if token_file is not None else None
        self._token_file, self._token = token_file, token

    async def close(self) -> None:
        """Stop serving: no new connections, running requests cancelled, socket removed."""
        server, self._server = self._server, None
        self._closing = True
        if server is not None:
            server.close()
        # Cancelled until they are done: before Python 3.12, asyncio.wait_for can
        # swallow a cancellation that arrives as its inner await completes, and a
        # stream (queue stats --watch) would then go on forever. Streams also stop
        # by themselves once they see _closing.
        pending = set(self._tasks)
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        if server is not None:
            # Python 3.11.7+ waits here for every connection's transport to go, and a
            # client that stopped reading keeps its transport flushing: bounded, so a
            # stuck empathctl cannot hold up the daemon's shutdown.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)
        await cancel_reloads(self.handlers)
        self._unlink()

    @property
    def serving(self) -> bool:
        return self._server is not None

    # ---- the socket file -------------------------------------------------------

    def _create_socket(self) -> socket.socket:
        path = self.path
        if not path.is_absolute():
            raise ControlError(f"control socket path {path} is not absolute")
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ControlError(f"control socket path {path} is longer than "
                               f"{MAX_SOCKET_PATH} bytes (a Unix socket limit)")
        parent = path.parent
        self._check_parent(parent)
        self._check_existing(path)
        tmpdir = Path(tempfile.mkdtemp(prefix=".c", dir=parent))  # 0700, ours alone
        tmp = tmpdir / "s"
        if len(os.fsencode(tmp)) > MAX_SOCKET_PATH:
            os.rmdir(tmpdir)
            raise ControlError(f"control socket directory {parent} has too long a path "
                               f"(a Unix socket path is at most {MAX_SOCKET_PATH} bytes)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fsdecode(tmp))
            # Nobody else can enter tmpdir, so these act on our socket and nothing
            # can connect before mode and group are right.
            os.chmod(tmp, SOCKET_MODE)
            group = self._give_to_group(tmp)
            st = os.lstat(tmp)
            sock.listen(BACKLOG)
            sock.setblocking(False)
            os.rename(tmp, path)
            self._inode = (st.st_dev, st.st_ino)
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ControlError(f"cannot create control socket {path}: {exc.strerror or exc}"
                               ) from None
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(tmpdir)
        log.info("control socket listening on %s (mode %04o, group %s)", path, SOCKET_MODE,
                 group, extra={"EMPATH_EVENT": "control-listening"})
        return sock

    @staticmethod
    def _check_parent(parent: Path) -> None:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            try:
                os.mkdir(parent, 0o755)
            except OSError as exc:
                raise ControlError(f"cannot create control socket directory {parent}: "
                                   f"{exc.strerror}") from None
            log.info("created control socket directory %s", parent)
            return
        except OSError as exc:
            raise ControlError(f"control socket directory {parent}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ControlError(f"control socket directory {parent} is not a directory")
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise ControlError(f"control socket directory {parent} is writable by everybody "
                               "(without the sticky bit): anyone could replace the socket")

    @staticmethod
    def _check_existing(path: Path) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(os.fsdecode(path))
        except OSError:
            return  # stale (nobody listening): replaced atomically by the rename
        finally:
            probe.close()
        raise ControlError(f"another process is serving the control socket {path} "
                           "(is empath already running?)")

    def _give_to_group(self, tmp: Path) -> str:
        """chown the socket to the admin group if possible; returns the group it has."""
        own_gid = os.getegid()
        try:
            gid = grp.getgrnam(self.admin_group).gr_gid
        except KeyError:
            name = _group_name(own_gid)
            log.warning("group %s does not exist: the control socket keeps group %s, so only "
                        "root, the daemon's user and members of %s can use empathctl",
                        self.admin_group, name, name)
            return name
        try:
            os.chown(tmp, -1, gid)
        except OSError as exc:
            name = _group_name(own_gid)
            if exc.errno not in (errno.EPERM, errno.EACCES):
                raise
            log.warning("cannot give the control socket to group %s (%s): the daemon's user "
                        "must be a member of it; the socket keeps group %s",
                        self.admin_group, exc.strerror, name)
            return name
        return self.admin_group

    def _unlink(self) -> None:
        """Remove the socket file, if it is still ours (never someone else's)."""
        if self._inode is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        self._inode = None

    # ---- connections -----------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        busy = len(self._conns) >= self.max_connections
        if busy and self._rejecting >= MAX_REJECTING:
            writer.close()  # far over the cap: not even a reply
            return
        if busy:
            self._rejecting += 1
        elif task is not None:
            self._conns.add(task)
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer, busy=busy)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # shutting down
        except Exception:
            log.exception("control: connection failed unexpectedly")
        finally:
            if busy:
                self._rejecting -= 1
            elif task is not None:
                self._conns.discard(task)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _send(self, writer: asyncio.StreamWriter, data: bytes,
                    timeout: float | None = None) -> None:
        writer.write(data)
        await asyncio.wait_for(writer.drain(), timeout or self.request_timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     *, busy: bool) -> None:
        lines = LineReader(reader, MAX_REQUEST)
        if busy:
            with contextlib.suppress(TimeoutError, LineTooLong):
                await asyncio.wait_for(lines.readline(), BUSY_TIMEOUT)
            await self._send(writer, encode_error(
                "busy", f"too many control connections ({self.max_connections}); try again"))
            return
        sock = writer.get_extra_info("socket")
        peer = peer_credentials(sock)
        refusal, user = await asyncio.to_thread(self._lookup, peer)
        while True:
            try:
                line = await asyncio.wait_for(lines.readline(), self.request_timeout)
            except TimeoutError:
                await self._send(writer, encode_error("timeout", "no request received in time"))
                return
            except LineTooLong as exc:
                # Answered at once, even while the rest of the line is still coming.
                await self._send(writer, encode_error(exc.code, exc.message))
                if exc.pending:
                    try:
                        resynced = await asyncio.wait_for(lines.skip_line(),
                                                          self.request_timeout)
                    except TimeoutError:
                        return
                    if not resynced:
                        return
                continue
            if line is None:
                return
            if refusal is not None:
                log.warning("control: refused uid=%d pid=%d user=%s: %s", peer.uid, peer.pid,
                            user, refusal, extra={"EMPATH_EVENT": "control-refused",
                                                  "CONTROL_UID": peer.uid,
                                                  "CONTROL_PID": peer.pid})
                await self._send(writer, encode_error("forbidden", refusal))
                return
            await self._handle(writer, line, peer, user)

    def _lookup(self, peer: Peer) -> tuple[str | None, str]:
        return authorize(peer, self.admin_group, self._daemon_uid), peer.user

    async def _handle(self, writer: asyncio.StreamWriter, line: bytes, peer: Peer,
                      user: str) -> None:
        try:
            req = parse_request(line)
        except ProtocolError as exc:
            await self._send(writer, encode_error(exc.code, exc.message))
            return
        bad_token = check_token(self._token, req.token)
        if bad_token is not None:
            log.warning("control: refused uid=%d pid=%d user=%s cmd=%s: %s", peer.uid,
                        peer.pid, user, req.cmd, bad_token,
                        extra={"EMPATH_EVENT": "control-refused", "CONTROL_UID": peer.uid,
                               "CONTROL_PID": peer.pid})
            await self._send(writer, encode_error("unauthorized", bad_token))
            return
        command = COMMANDS.get(req.cmd)
        if command is None:
            await self._send(writer, encode_error(
                "unknown-command",
                f"unknown command {req.cmd!r} (known: {', '.join(sorted(COMMANDS))})"))
            return

        def audit(text: str, **fields: Any) -> None:
            extra = {"EMPATH_EVENT": "control", "CONTROL_UID": peer.uid,
                     "CONTROL_PID": peer.pid, "CONTROL_USER": user,
                     "CONTROL_COMMAND": req.cmd, **fields}
            log.info("control uid=%d pid=%d user=%s cmd=%s: %s", peer.uid, peer.pid, user,
                     req.cmd, text, extra=extra)

        ctx = CommandContext(self.handlers, peer, req.cmd, audit)
        try:
            result = await command.fn(ctx, req.args)
        except ProtocolError as exc:
            if command.mutating:
                log.info("control uid=%d pid=%d user=%s cmd=%s refused: %s", peer.uid,
                         peer.pid, user, req.cmd, exc.message,
                         extra={"EMPATH_EVENT": "control", "CONTROL_UID": peer.uid,
                                "CONTROL_PID": peer.pid, "CONTROL_USER": user,
                                "CONTROL_COMMAND": req.cmd})
            await self._send(writer, encode_error(exc.code, exc.message, exc.detail))
            return
        except Exception as exc:
            log.exception("control: %s failed", req.cmd)
            await self._send(writer, encode_error(
                "internal", f"{req.cmd} failed: {exc or type(exc).__name__}"))
            return
        if isinstance(result, Stream):
            await self._stream(writer, req.cmd, result)
            return
        try:
            data = encode_result(result)
        except (TypeError, ValueError) as exc:
            log.exception("control: %s returned a result that is not JSON", req.cmd)
            data = encode_error("internal", f"{req.cmd}: unserialisable result: {exc}")
        await self._send(writer, data)

    async def _stream(self, writer: asyncio.StreamWriter, cmd: str, stream: Stream) -> None:
        """Send each item with ``more``, then a final line without (result null).

        A client going away ends it (the write fails), and so does one that reads
        nothing for ``STREAM_TIMEOUT``."""
        timeout = max(self.request_timeout, STREAM_TIMEOUT)
        try:
            async for item in stream.items:
                if self._closing:
                    return
                await self._send(writer, encode_result(item, more=True), timeout)
        except ProtocolError as exc:
            await self._send(writer, encode_error(exc.code, exc.message, exc.detail))
            return
        except (ConnectionError, TimeoutError):
            raise
        except Exception as exc:
            log.exception("control: %s stream failed", cmd)
            await self._send(writer, encode_error("internal", f"{cmd} failed: {exc}"))
            return
        finally:
            aclose = getattr(stream.items, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        await self._send(writer, encode_result(None))


# Seconds close() waits for the connections' transports to finish closing.
CLOSE_TIMEOUT = 2.0


def _timeout_from_env() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return REQUEST_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value < 86400:
        log.warning("ignoring %s=%r: not a number of seconds; using %g s", TIMEOUT_ENV, raw,
                    REQUEST_TIMEOUT)
        return REQUEST_TIMEOUT
    return value


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
