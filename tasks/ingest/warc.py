"""A WARC reader that survives corruption: a bad record costs that record, not the rest of the file.

Records are parsed by hand over a stream of decompressed bytes. A `.warc.gz` is a series of gzip
members (usually one per record): a member that fails to inflate is skipped by searching for the
next gzip header, and the parser resynchronises on the next `WARC/` header line.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

GZIP_MAGIC = b"\x1f\x8b\x08"
READ_SIZE = 1 << 20
FEED_SIZE = 1 << 16     # bytes given to the inflater at once: bounds the copy of `unused_data`
WARC_START = b"WARC/"


@dataclass
class WarcRecord:
    headers: dict[str, str]
    block: bytes
    offset: int               # record number in the file, for error messages

    @property
    def type(self) -> str:
        return self.headers.get("warc-type", "")


@dataclass
class Corruption:
    """A stretch of the file that could not be read; `reason` names what went wrong."""

    reason: str
    detail: str
    where: str


class _RawStream:
    """The compressed file read READ_SIZE bytes at a time, with a cursor that only moves forward (or seeks)."""

    def __init__(self, handle: BinaryIO) -> None:
        """Starts at the beginning of `handle`."""
        self.handle, self.chunk, self.pos, self.base = handle, b"", 0, 0

    @property
    def offset(self) -> int:
        """File offset of the cursor."""
        return self.base + self.pos

    def piece(self) -> memoryview:
        """Up to FEED_SIZE bytes at the cursor, without moving it; empty at end of file."""
        if self.pos >= len(self.chunk):
            self.base += len(self.chunk)
            self.chunk, self.pos = self.handle.read(READ_SIZE), 0
        return memoryview(self.chunk)[self.pos:self.pos + FEED_SIZE]

    def advance(self, count: int) -> None:
        """Moves the cursor `count` bytes forward (within the current piece)."""
        self.pos += count

    def seek(self, offset: int) -> None:
        """Moves the cursor to file offset `offset`."""
        self.handle.seek(offset)
        self.chunk, self.pos, self.base = b"", 0, offset

    def skip_to(self, needle: bytes, start: int) -> None:
        """Moves the cursor to the first `needle` at or after file offset `start`, else to end of file."""
        self.handle.seek(start)
        tail, tail_offset = b"", start
        while block := self.handle.read(READ_SIZE):
            data = tail + block
            index = data.find(needle)
            if index >= 0:
                return self.seek(tail_offset + index)
            keep = min(len(needle) - 1, len(data))
            tail, tail_offset = data[len(data) - keep:], tail_offset + len(data) - keep
        self.seek(self.handle.tell())


def _gzip_chunks(path: Path) -> Iterator[bytes | Corruption]:
    """Inflates member after member, streaming; a corrupt member becomes a Corruption and we skip to the next."""
    with open(path, "rb") as handle:
        raw, member = _RawStream(handle), 0
        while raw.piece():
            yield from _inflate_member(raw, member)
            member += 1


def _inflate_member(raw: _RawStream, member: int) -> Iterator[bytes | Corruption]:
    """Yields one member's bytes then b"" (member boundary), or a Corruption; leaves the cursor after it."""
    start, inflater = raw.offset, zlib.decompressobj(31)
    while piece := raw.piece():
        try:
            out = inflater.decompress(piece)
        except zlib.error as err:
            yield Corruption("corrupt_gzip", str(err), f"gzip member {member} at byte {start}")
            raw.skip_to(GZIP_MAGIC, start + 1)
            return
        raw.advance(len(piece) - len(inflater.unused_data))
        if out:
            yield out
        if inflater.eof:
            yield b""  # member boundary: lets the parser finish the record it holds
            return
    yield Corruption("truncated_gzip", "file ends inside a gzip member", f"gzip member {member} at byte {start}")


def _plain_chunks(path: Path) -> Iterator[bytes | Corruption]:
    """The file's bytes, READ_SIZE at a time."""
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_SIZE):
            yield chunk


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.split(b"\r\n")[1:]:
        name, _, value = line.decode("utf-8", "replace").partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return headers


def _resync(buffer: bytearray) -> None:
    """Drop bytes up to the next line that starts a WARC record."""
    index = buffer.find(b"\n" + WARC_START, 1)
    del buffer[: index + 1 if index >= 0 else len(buffer)]


def iter_warc(path: Path) -> Iterator[WarcRecord | Corruption]:
    """Yields every readable record of a WARC or WARC.gz file, and a Corruption for each unreadable stretch."""
    chunks = _gzip_chunks(path) if path.name.endswith(".gz") else _plain_chunks(path)
    buffer, number = bytearray(), 0
    for chunk in chunks:
        if isinstance(chunk, Corruption):
            if buffer.strip():
                yield Corruption("truncated_record", f"{len(buffer)} bytes of a record lost", f"record {number}")
                number += 1
            buffer.clear()
            yield chunk
            continue
        buffer += chunk
        while True:
            parsed = _take_record(buffer, number)
            if parsed is None:
                break
            yield parsed
            number += 1
    if buffer.strip():
        yield Corruption("truncated_record", f"file ends {len(buffer)} bytes into a record", f"record {number}")


def _take_record(buffer: bytearray, number: int) -> WarcRecord | Corruption | None:
    """Removes one complete record from the front of `buffer`; None if more bytes are needed."""
    while buffer[:2] in (b"\r\n", b"\n\n") or buffer[:1] == b"\n":
        del buffer[:1]
    if not buffer.strip(b"\r\n"):
        return None  # only the blank line between records so far (a read ended inside it)
    if not buffer.startswith(WARC_START[: len(buffer)]):
        _resync(buffer)
        return Corruption("corrupt_record", "bytes that are not a WARC header", f"record {number}")
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    headers = _parse_headers(bytes(buffer[:end]))
    try:
        length = int(headers["content-length"])
    except (KeyError, ValueError):
        del buffer[:end + 4]
        _resync(buffer)
        return Corruption("corrupt_record", "missing or invalid Content-Length", f"record {number}")
    start = end + 4
    if len(buffer) < start + length:
        return None
    record = WarcRecord(headers, bytes(buffer[start:start + length]), number)
    del buffer[: start + length]
    return record


@dataclass
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_http_response(block: bytes) -> HttpResponse | None:
    """Splits an `application/http; msgtype=response` block; None when it is not one."""
    end = block.find(b"\r\n\r\n")
    if end < 0 or not block.startswith(b"HTTP/"):
        return None
    status_line, _, header_text = block[:end].partition(b"\r\n")
    try:
        status = int(status_line.split()[1])
    except (IndexError, ValueError):
        return None
    headers = _parse_headers(b"x\r\n" + header_text)
    body = block[end + 4:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body)
    return HttpResponse(status, headers, body)


def _dechunk(body: bytes) -> bytes:
    out, pos = bytearray(), 0
    while pos < len(body):
        line_end = body.find(b"\r\n", pos)
        if line_end < 0:
            break
        try:
            size = int(body[pos:line_end].split(b";")[0], 16)
        except ValueError:
            return body  # not really chunked: keep what the server sent
        if size == 0:
            break
        out += body[line_end + 2: line_end + 2 + size]
        pos = line_end + 2 + size + 2
    return bytes(out)
