"""The public API's messages as JSON-ready data, the one form every JSON output of the CLI takes
(``--stats-json`` of ``run`` and ``generate``, ``models``, ``status``).

It is the protobuf JSON mapping (field names as in the .proto files, enums by their names, every
field written, unset optional fields left out), except that 64-bit integers are numbers: the
mapping writes them as strings for JavaScript's sake, which no reader of a seed or a byte count
expects. Python's ``json`` and every JSON reader we know keep them exact.
"""

from __future__ import annotations

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from hybridiff.v1 import diffusion_pb2 as pb

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_json(message: Message) -> dict:
    """``message`` as JSON-ready data (see the module's doc)."""
    data = MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    return _numbers(message.DESCRIPTOR, data)


def response_json(response: pb.GenerateResponse) -> dict:
    """A generation's request id, seed and statistics (the images are written apart)."""
    return {"request_id": response.request_id, "seed": response.seed, **message_json(response.stats)}


def _numbers(descriptor, data: dict) -> dict:
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            if isinstance(value, list):
                data[field.name] = [_numbers(field.message_type, v) for v in value]
            elif isinstance(value, dict):
                data[field.name] = _numbers(field.message_type, value)
        elif field.type in _INT64:
            data[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data
