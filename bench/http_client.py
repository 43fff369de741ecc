"""A minimal HTTP/1.1 client for the gateway benchmark's load: one keep-alive
connection per stream, a fixed request, the whole response read as it comes.

httpx spends more CPU per request than the platform under test once hundreds
of connections are open (its pool looks connections up one by one), so with
httpx the load generator, not the platform, set the pace at 256 streams. This
client does only what the benchmark needs: send a prepared request, read the
status, the headers and a chunked or sized body.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


class HttpConnection:
    """One keep-alive connection that posts ``body`` to ``url`` with ``headers``."""

    def __init__(self, url: str, body: bytes, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(f"need host and port in {url!r}")
        self._host, self._port = parts.hostname, parts.port
        lines = [f"POST {parts.path} HTTP/1.1", f"host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += [f"content-length: {len(body)}", "", ""]
        self._request = "\r\n".join(lines).encode("latin-1") + body
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self) -> Response:
        if self._streams is None:
            self._streams = await asyncio.open_connection(self._host, self._port)
        reader, writer = self._streams
        try:
            writer.write(self._request)
            status = int((await reader.readline()).split(b" ", 2)[1])
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("transfer-encoding") == "chunked":
                body = await _chunked(reader)
            else:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
        except BaseException:
            await self.close()  # the connection's state is unknown: start afresh
            raise
        if headers.get("connection") == "close":
            await self.close()
        return Response(status, body)

    async def close(self) -> None:
        if self._streams is not None:
            _, writer = self._streams
            self._streams = None
            writer.close()


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)  # the data and its CRLF
        if size == 0:
            return bytes(body)
        body += chunk[:-2]
