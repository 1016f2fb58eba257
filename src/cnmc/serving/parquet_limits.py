"""What a Parquet request body decodes to, measured before anything decodes it.

A Parquet file's footer says how large its row groups are, but nothing holds a writer to it: a body
of a few hundred bytes can claim a few bytes and decompress to gigabytes (a page of zeros under
zstd), or repeat one large dictionary value in every row. So the footer is read only to find the
pages; each page's own header gives the size its decompressor is held to (Arrow refuses a page that
decompresses past it) and how many values it holds, and those are summed. Dictionary columns are
then read as dictionaries (no value repeated in memory) and measured as if every row held its value.
Only then does anything decode the body whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Thrift compact protocol types (the encoding of Parquet's page headers).
_TRUE, _FALSE, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY, _LIST, _SET, _MAP, _STRUCT = range(1, 13)
_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 5, 7, 8  # PageHeader fields holding num_values (their field 1)
_MAX_HEADER_DEPTH = 8


class _Malformed(ValueError):
    pass


class _CompactReader:
    """Just enough of Thrift's compact protocol to read a Parquet page header."""

    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise _Malformed("page header runs past the body")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 63:
                raise _Malformed("varint too long")

    def zigzag(self) -> int:
        n = self.varint()
        return (n >> 1) ^ -(n & 1)

    def struct(self, depth: int = 0) -> dict[int, object]:
        """A struct's integer fields and nested structs by field id; anything else skipped."""
        if depth > _MAX_HEADER_DEPTH:
            raise _Malformed("page header nested too deep")
        fields: dict[int, object] = {}
        field = 0
        while (header := self.byte()) != 0:
            delta, kind = header >> 4, header & 0x0F
            field = field + delta if delta else self.zigzag()
            fields[field] = self.value(kind, depth)
        return fields

    def value(self, kind: int, depth: int) -> object:
        if kind in (_TRUE, _FALSE):
            return kind == _TRUE
        if kind == _BYTE:
            return self.byte()
        if kind in (_I16, _I32, _I64):
            return self.zigzag()
        if kind == _DOUBLE:
            self.skip(8)
        elif kind == _BINARY:
            self.skip(self.varint())
        elif kind in (_LIST, _SET):
            header = self.byte()
            size = header >> 4 if header >> 4 != 15 else self.varint()
            for _ in range(size):
                self.value(header & 0x0F, depth + 1)
        elif kind == _MAP:
            size = self.varint()
            if size:
                types = self.byte()
                for _ in range(size):
                    self.value(types >> 4, depth + 1)
                    self.value(types & 0x0F, depth + 1)
        elif kind == _STRUCT:
            return self.struct(depth + 1)
        else:
            raise _Malformed(f"unknown thrift type {kind}")
        return None

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise _Malformed("page header runs past the body")
        self.pos += n


def _page_headers(body: bytes, start: int, end: int) -> Iterator[tuple[dict[int, object], int]]:
    """Each page's header between ``start`` and ``end``, with where its payload begins."""
    pos = start
    while pos < end:
        reader = _CompactReader(body, pos)
        header = reader.struct()
        size, compressed = header.get(2), header.get(3)
        if not isinstance(size, int) or not isinstance(compressed, int) or size < 0 or compressed < 0:
            raise _Malformed("page header without its sizes")
        yield header, reader.pos
        pos = reader.pos + compressed


def _sub(header: dict[int, object], field: int) -> dict[int, object]:
    sub = header.get(field)
    return sub if isinstance(sub, dict) else {}


def _int(fields: dict[int, object], field: int, default: int = 0) -> int:
    value = fields.get(field, default)
    return max(int(value), 0) if isinstance(value, int) else default


class UnreadableParquet(ValueError):
    """Page headers or pages that cannot be read."""


def page_totals(body: bytes, metadata: pq.FileMetaData) -> tuple[int, int]:
    """Bytes the body's pages decompress to, and the values they hold, from each page's own header
    (the footer only says where the pages are)."""
    decoded = values = 0
    try:
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                chunk = metadata.row_group(group).column(column)
                first = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
                start = min(o for o in (first, chunk.data_page_offset) if o is not None)
                for header, _ in _page_headers(body, start, min(start + chunk.total_compressed_size, len(body))):
                    decoded += _int(header, 2)
                    values += _int(_sub(header, _DATA_PAGE), 1) + _int(_sub(header, _DATA_PAGE_V2), 1)
    except (_Malformed, OSError, ValueError, TypeError) as exc:
        raise UnreadableParquet(str(exc)) from None
    return decoded, values


def spread_size(body: bytes, metadata: pq.FileMetaData) -> int:
    """Bytes the dictionary-encoded pages hold once each row's dictionary value is written out.

    Arrow spreads a dictionary page over its rows whole while it reads (one 900 kB value in 60 rows
    is 54 MB at its peak), so the indices are read here: the dictionary's value lengths, then each
    page's run-length and bit-packed indices, a long run counted without being spread. Called once
    :func:`page_totals` has bounded every page's decompressed size."""
    total = 0
    try:
        for group in range(metadata.num_row_groups):
            for column in range(metadata.num_columns):
                total += _chunk_spread(body, metadata, group, column)
    except (_Malformed, OSError, ValueError, IndexError, pa.ArrowException) as exc:
        raise UnreadableParquet(str(exc)) from None
    return total


def _chunk_spread(body: bytes, metadata: pq.FileMetaData, group: int, column: int) -> int:
    chunk = metadata.row_group(group).column(column)
    if not chunk.has_dictionary_page or chunk.physical_type != "BYTE_ARRAY":
        return 0
    if metadata.schema.column(column).max_repetition_level > 0:
        raise _Malformed("a nested column")
    codec = None if chunk.compression == "UNCOMPRESSED" else pa.Codec(_CODECS.get(chunk.compression, "?"))
    start = min(o for o in (chunk.dictionary_page_offset, chunk.data_page_offset) if o is not None)
    lengths = np.zeros(0, np.int64)
    total = 0
    for header, at in _page_headers(body, start, min(start + chunk.total_compressed_size, len(body))):
        size, payload = _int(header, 2), body[at : at + _int(header, 3)]
        if header.get(1) == 2:  # DICTIONARY_PAGE: PLAIN byte arrays, each after its 4-byte length
            lengths = _plain_lengths(_inflate(codec, payload, size), _int(_sub(header, _DICTIONARY_PAGE), 1))
        elif header.get(1) == 0 and _int(_sub(header, _DATA_PAGE), 2) in _DICTIONARY_ENCODINGS:
            page = _inflate(codec, payload, size)
            levels = (
                4 + int.from_bytes(page[:4], "little") if metadata.schema.column(column).max_definition_level else 0
            )
            total += _indices_spread(page[levels:], lengths, _int(_sub(header, _DATA_PAGE), 1))
        elif header.get(1) == 3 and _int(_sub(header, _DATA_PAGE_V2), 4) in _DICTIONARY_ENCODINGS:
            v2 = _sub(header, _DATA_PAGE_V2)
            levels = _int(v2, 5) + _int(v2, 6)
            values = payload[levels:] if v2.get(7) is False else _inflate(codec, payload[levels:], size - levels)
            total += _indices_spread(values, lengths, _int(v2, 1))
    return total


_CODECS = {"SNAPPY": "snappy", "GZIP": "gzip", "BROTLI": "brotli", "ZSTD": "zstd", "LZ4_RAW": "lz4_raw", "LZ4": "lz4"}
_DICTIONARY_ENCODINGS = {2, 8}  # PLAIN_DICTIONARY, RLE_DICTIONARY


def _inflate(codec: pa.Codec | None, payload: bytes, size: int) -> bytes:
    return payload if codec is None else codec.decompress(payload, decompressed_size=size).to_pybytes()


def _plain_lengths(page: bytes, count: int) -> np.ndarray:
    lengths, pos = [], 0
    for _ in range(count):
        n = int.from_bytes(page[pos : pos + 4], "little")
        lengths.append(n)
        pos += 4 + n
        if pos > len(page):
            raise _Malformed("dictionary page shorter than its values")
    return np.asarray(lengths, np.int64)


def _indices_spread(data: bytes, lengths: np.ndarray, count: int) -> int:
    """Sum of ``lengths`` over the first ``count`` dictionary indices of a page's values (a bit width,
    then runs: repeated values counted at once, bit-packed groups unpacked)."""
    if not data or count == 0:
        return 0
    width, reader, total = data[0], _CompactReader(data, 1), 0
    if width > 32:
        raise _Malformed("index bit width over 32")
    while count > 0 and reader.pos < len(data):
        run = reader.varint()
        if run & 1:  # bit-packed: (run >> 1) groups of 8 indices
            groups = run >> 1
            packed = np.frombuffer(data, np.uint8, count=groups * width, offset=reader.pos)
            reader.skip(groups * width)
            bits = np.unpackbits(packed, bitorder="little").reshape(-1, width) if width else np.zeros((groups * 8, 0))
            indices = (bits.astype(np.int64) << np.arange(width, dtype=np.int64)).sum(axis=1)[:count]
            total += int(lengths[indices].sum())
            count -= len(indices)
        else:  # one index repeated (run >> 1) times
            repeat = min(run >> 1, count)
            value = int.from_bytes(data[reader.pos : reader.pos + (width + 7) // 8], "little")
            reader.skip((width + 7) // 8)
            total += repeat * int(lengths[value])
            count -= repeat
    return total
