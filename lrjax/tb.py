"""A minimal TensorBoard event-file writer (scalars only) that needs neither TensorFlow nor tensorboardX.

An event file is a sequence of TFRecords: uint64 length, uint32 masked-CRC32C(length), the payload,
uint32 masked-CRC32C(payload). Each payload is a serialized `Event` protobuf; we write the few fields used:

  Event   {1: wall_time double, 2: step int64, 3: file_version string, 5: summary Summary}
  Summary {1: repeated Value}
  Value   {1: tag string, 2: simple_value float}
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC_TABLE = []
for _i in range(256):
  _c = _i
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
  _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), as TFRecord uses."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
  out = bytearray()
  n &= (1 << 64) - 1
  while True:
    byte = n & 0x7F
    n >>= 7
    if n:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
  return _varint((number << 3) | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _field(number, 2) + _varint(len(payload)) + payload


def event_bytes(*, wall_time: float, step: int | None = None, file_version: str | None = None,
                scalars: dict[str, float] | None = None) -> bytes:
  """A serialized Event protobuf."""
  out = _field(1, 1) + struct.pack("<d", wall_time)
  if step is not None:
    out += _field(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(
        _bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
        for tag, v in scalars.items())
    out += _bytes_field(5, values)
  return out


def record_bytes(payload: bytes) -> bytes:
  """One TFRecord framing `payload`."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload
          + struct.pack("<I", masked_crc32c(payload)))


class EventWriter:
  """Appends scalar summaries to `logdir/events.out.tfevents.<time>.<host>` (flushes every write)."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    self.path = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    self._file = open(self.path, "ab")
    self._write(event_bytes(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, payload: bytes) -> None:
    self._file.write(record_bytes(payload))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]) -> None:
    self._write(event_bytes(wall_time=time.time(), step=step, scalars=values))

  def close(self) -> None:
    self._file.close()


def read_records(path: str) -> list[bytes]:
  """The payloads of a TFRecord file, verifying both checksums of every record (for tests and tools)."""
  out = []
  with open(path, "rb") as f:
    data = f.read()
  i = 0
  while i < len(data):
    header = data[i:i + 8]
    (n,) = struct.unpack("<Q", header)
    (hcrc,) = struct.unpack("<I", data[i + 8:i + 12])
    if hcrc != masked_crc32c(header):
      raise ValueError(f"{path}: bad length checksum at byte {i}")
    payload = data[i + 12:i + 12 + n]
    (pcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
    if pcrc != masked_crc32c(payload):
      raise ValueError(f"{path}: bad payload checksum at byte {i}")
    out.append(payload)
    i += 16 + n
  return out
