"""Merge a GGUF split in parts (llama.cpp's `gguf-split`, gguf-py's `split_max_*`) into
one file, as `gguf-split --merge` does, streaming: nothing is held in memory but the
headers.

Each part is a GGUF of its own (little-endian; versions 2 and 3):

    "GGUF" u32:version u64:n_tensors u64:n_kv
    n_kv × (string:key u32:type value)           string = u64:length bytes
    n_tensors × (string:name u32:n_dims n_dims×u64:dim u32:ggml_type u64:offset)
    padding to `general.alignment` (default 32), then the tensor data, each tensor at
    its offset from the start of the data

with `split.no` (u16, from 0), `split.count` (u16) and `split.tensors.count` (i32) among
its keys. The merged file takes the first part's keys without the three `split.*`
ones, every part's tensor infos in order with offsets into one data section, and the
data. A tensor's bytes run from its offset to the next tensor's (or the end of its
part); each starts aligned in the merged file. What the merge does not check (types
against sizes) the loader does: the merged file is loaded as a model before it is
installed.

Limits, because the parts come from the network: header strings up to 16 MiB, arrays
up to 16M elements, at most 1M keys and tensors a part and 10k parts; every length is
checked against what is left of the file before it is read.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_STRING = 16 << 20
MAX_ARRAY = 16 << 20
MAX_ITEMS = 1 << 20
MAX_PARTS = 10_000
CHUNK = 1 << 20
SPLIT_KEYS = (b"split.no", b"split.count", b"split.tensors.count")
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type → size
STRING, ARRAY = 8, 9


class SplitError(ValueError):
    """A part that is not a GGUF split or does not belong with the others."""


class _Reader:
    """A bounded cursor over a file: every read is checked against the file's size."""

    def __init__(self, f: BinaryIO, size: int, name: str) -> None:
        self.f, self.size, self.name = f, size, name

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise SplitError(f"{self.name}: {what} runs past the end of the file")
        return self.f.read(n)

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(struct.unpack("<Q", self.take(8, what))[0])

    def string(self, what: str) -> bytes:
        n = self.u64(what)
        if n > MAX_STRING:
            raise SplitError(f"{self.name}: {what} is {n} bytes long (limit {MAX_STRING})")
        return self.take(n, what)

    def value(self, ty: int, what: str, depth: int = 0) -> bytes:
        """A value's bytes, as they are in the file."""
        if ty in _SCALAR:
            return self.take(_SCALAR[ty], what)
        if ty == STRING:
            s = self.string(what)
            return struct.pack("<Q", len(s)) + s
        if ty == ARRAY and depth == 0:
            ety, n = self.u32(what), self.u64(what)
            if n > MAX_ARRAY:
                raise SplitError(f"{self.name}: {what} has {n} elements (limit {MAX_ARRAY})")
            head = struct.pack("<IQ", ety, n)
            if ety in _SCALAR:
                return head + self.take(n * _SCALAR[ety], what)
            return head + b"".join(self.value(ety, what, depth + 1) for _ in range(n))
        raise SplitError(f"{self.name}: {what} has value type {ty}, which GGUF does not have")


@dataclass
class _Tensor:
    info: bytes  # name, n_dims, dims, type (without the offset)
    offset: int
    size: int  # bytes up to the next tensor or the end of the part


@dataclass
class _Part:
    path: Path
    version: int
    kv: list[tuple[bytes, bytes]]  # key, type + value bytes
    split_no: int
    split_count: int
    n_total: int
    alignment: int
    data_start: int
    tensors: list[_Tensor]


def _read_part(path: Path) -> _Part:
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, size, path.name)
        if r.take(4, "the magic") != b"GGUF":
            raise SplitError(f"{path.name} is not a GGUF file")
        version = r.u32("the version")
        if version not in (2, 3):
            raise SplitError(f"{path.name}: GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = r.u64("the tensor count"), r.u64("the key count")
        if n_tensors > MAX_ITEMS or n_kv > MAX_ITEMS:
            raise SplitError(f"{path.name}: {n_tensors} tensors and {n_kv} keys (limit {MAX_ITEMS} each)")
        kv, meta = [], {}
        for i in range(n_kv):
            key = r.string(f"key {i}")
            ty = r.u32(f"the type of {key[:64]!r}")
            val = r.value(ty, f"the value of {key[:64]!r}")
            kv.append((key, struct.pack("<I", ty) + val))
            if key in SPLIT_KEYS or key == b"general.alignment":
                meta[key] = (ty, val)
        infos = []
        for i in range(n_tensors):
            name = r.string(f"tensor {i}'s name")
            n_dims = r.u32(f"tensor {name[:64]!r}'s dimensions")
            if n_dims > 8:
                raise SplitError(f"{path.name}: tensor {name[:64]!r} has {n_dims} dimensions")
            rest = r.take(8 * n_dims + 4, f"tensor {name[:64]!r}'s shape")
            offset = r.u64(f"tensor {name[:64]!r}'s offset")
            infos.append((struct.pack("<Q", len(name)) + name + struct.pack("<I", n_dims) + rest, offset))
        header_end = f.tell()

    def number(key: bytes, default: int | None = None) -> int:
        if key not in meta:
            if default is None:
                raise SplitError(f"{path.name} is not a split GGUF (no {key.decode()})")
            return default
        ty, val = meta[key]
        if ty not in (0, 1, 2, 3, 4, 5, 10, 11):
            raise SplitError(f"{path.name}: {key.decode()} is not an integer")
        fmt = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[len(val)]
        return int(struct.unpack(fmt, val)[0])

    alignment = number(b"general.alignment", 32)
    if not 1 <= alignment <= 1 << 20 or alignment & (alignment - 1):
        raise SplitError(f"{path.name}: general.alignment {alignment} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    order = sorted(range(len(infos)), key=lambda i: infos[i][1])
    tensors: list[_Tensor] = [_Tensor(b"", 0, 0)] * len(infos)
    for k, i in enumerate(order):
        off = infos[i][1]
        end = infos[order[k + 1]][1] if k + 1 < len(order) else size - data_start
        if off % alignment or data_start + end > size or end < off:
            raise SplitError(f"{path.name}: a tensor's offset {off} is not aligned or lies outside the file")
        tensors[i] = _Tensor(infos[i][0], off, end - off)
    return _Part(
        path,
        version,
        kv,
        number(b"split.no"),
        number(b"split.count"),
        number(b"split.tensors.count"),
        alignment,
        data_start,
        tensors,
    )


def merge(paths: list[Path], out: Path) -> str:
    """Merge the parts (in order) into `out`; returns the merged file's digest
    ("sha256:<hex>"). SplitError names what does not fit."""
    if not 1 <= len(paths) <= MAX_PARTS:
        raise SplitError(f"{len(paths)} parts (1 to {MAX_PARTS})")
    parts = [_read_part(p) for p in paths]
    first = parts[0]
    for i, p in enumerate(parts):
        if p.split_no != i or p.split_count != len(parts) or p.n_total != first.n_total:
            raise SplitError(
                f"{p.path.name} is part {p.split_no + 1} of {p.split_count} of a model of {p.n_total} "
                f"tensors; expected part {i + 1} of {len(parts)} of {first.n_total}"
            )
        if p.alignment != first.alignment:
            raise SplitError(f"{p.path.name} aligns tensors to {p.alignment}, the first part to {first.alignment}")
    tensors = [(p, t) for p in parts for t in p.tensors]
    if len(tensors) != first.n_total:
        raise SplitError(f"the parts hold {len(tensors)} tensors; split.tensors.count says {first.n_total}")
    align = first.alignment
    kv = [(k, v) for k, v in first.kv if k not in SPLIT_KEYS]
    offsets, pos = [], 0
    for _, t in tensors:
        pos = -(-pos // align) * align
        offsets.append(pos)
        pos += t.size
    header = bytearray(b"GGUF" + struct.pack("<IQQ", first.version, len(tensors), len(kv)))
    for k, v in kv:
        header += struct.pack("<Q", len(k)) + k + v
    for (_, t), off in zip(tensors, offsets):
        header += t.info + struct.pack("<Q", off)
    header += bytes(-len(header) % align)
    h = hashlib.sha256()
    with open(out, "wb") as f:
        f.write(header)
        h.update(header)
        written = 0
        for (p, t), off in zip(tensors, offsets):
            pad = bytes(off - written)
            f.write(pad)
            h.update(pad)
            with open(p.path, "rb") as src:
                src.seek(p.data_start + t.offset)
                left = t.size
                while left:
                    b = src.read(min(CHUNK, left))
                    if not b:
                        raise SplitError(f"{p.path.name} ended inside a tensor")
                    f.write(b)
                    h.update(b)
                    left -= len(b)
            written = off + t.size
        f.flush()
        os.fsync(f.fileno())
    return "sha256:" + h.hexdigest()
