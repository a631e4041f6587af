"""Which field made a request unparseable, so the caller gets INVALID_ARGUMENT naming it.

protobuf refuses a message whose string field is not UTF-8, or whose wire format is cut
short, with a DecodeError that names no field; gRPC would answer UNKNOWN. ``bad_field``
walks the wire format (tag, then a varint, 8, 4 or length-delimited bytes) to find the
first field at fault: ``user_id``, ``recent_item_ids``, ``context.key``, ``allow.value.values``.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def bad_field(data: bytes, descriptor: Descriptor, prefix: str = "") -> str | None:
    """The path of the first field of ``data`` that cannot be parsed, None when every
    field parses (the fault is elsewhere, e.g. a nested message the walk skipped)."""
    pos = 0
    while pos < len(data):
        try:
            tag, pos = _varint(data, pos)
        except IndexError:
            return prefix.rstrip(".") or "request"
        number, wire = tag >> 3, tag & 7
        field = descriptor.fields_by_number.get(number)
        # an unknown field is the fault of the message that holds it
        name = prefix + field.name if field is not None else prefix.rstrip(".") or "request"
        try:
            pos, chunk = _skip(data, pos, wire)
        except (IndexError, ValueError):
            return name
        if field is None or chunk is None:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return name
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            inner = bad_field(chunk, field.message_type, name + ".")
            if inner is not None:
                return inner
    return None


def _skip(data: bytes, pos: int, wire: int) -> tuple[int, bytes | None]:
    """(position after the value, its bytes when length-delimited)."""
    if wire == _VARINT:
        return _varint(data, pos)[1], None
    if wire in (_I64, _I32):
        end = pos + (8 if wire == _I64 else 4)
    elif wire == _LEN:
        size, pos = _varint(data, pos)
        end = pos + size
    else:
        raise ValueError(f"wire type {wire} is not used by proto3")
    if end > len(data):
        raise IndexError("value runs past the end of the message")
    return end, (data[pos:end] if wire == _LEN else None)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]  # IndexError when cut short
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("varint longer than 10 bytes")
