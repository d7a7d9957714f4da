"""Supervisor ↔ worker messages: newline-delimited JSON over a Unix socketpair.

Small and boring on purpose: one line per message, a ``t`` field for its type.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

__all__ = ["Channel", "open_channel"]

MAX_LINE = 16 * 1024 * 1024  # a config text travels this way


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def send(self, msg: dict[str, Any]) -> None:
        if self.writer.is_closing():
            return
        self.writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")

    async def recv(self) -> dict[str, Any] | None:
        """Next message, or None at EOF (the other side is gone)."""
        try:
            line = await self.reader.readline()
        except (ConnectionError, asyncio.LimitOverrunError, ValueError):
            return None
        if not line:
            return None
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise ValueError("IPC message is not an object")
        return msg

    def close(self) -> None:
        self.writer.close()


async def open_channel(sock: socket.socket) -> Channel:
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
    return Channel(reader, writer)
