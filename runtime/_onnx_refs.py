"""The external-data files an ONNX model file refers to, read from its protobuf bytes without the `onnx` package.

The runtime's base dependencies do not include `onnx`, and loading a graph with ONNX Runtime would already open
its external data.  This module walks the protobuf wire format of ``ModelProto`` just far enough to find every
``TensorProto`` (initializers, sparse initializers, tensor attributes of nodes, in subgraphs and model-local
functions, training graphs) and returns the ``location`` of those stored externally.  It reads nothing else: no
shapes, types or weights.  Field numbers are those of onnx.proto (ONNX IR version 10+).
"""

from __future__ import annotations

__all__ = ["OnnxParseError", "external_data_locations", "initializer_record"]

# Field numbers from onnx.proto.  Messages not listed here (types, value infos, metadata) are skipped whole.
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)  # initialization, algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO = 7, 11
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_SPARSE = (5, 10), (6, 11), (22, 23)  # single, repeated
_SPARSE_TENSORS = (1, 2)  # values, indices
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_MAX_DEPTH = 64


class OnnxParseError(ValueError):
    """The bytes are not a well-formed ONNX protobuf message."""


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise OnnxParseError("truncated or malformed varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value) of one message; length-delimited values are (start, end) offsets."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 5:
            value, pos = None, pos + 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            value, pos = (pos, pos + size), pos + size
        else:
            raise OnnxParseError(f"unsupported protobuf wire type {wire} (field {field})")
        if pos > end:
            raise OnnxParseError(f"field {field} runs past the end of its message")
        yield field, wire, value


def _sub(buf: memoryview, field: int, wire: int, value) -> tuple[int, int]:
    if wire != 2:
        raise OnnxParseError(f"field {field} should be a message, has wire type {wire}")
    return value


def _tensor(buf: memoryview, span: tuple[int, int], out: list[tuple[str, str | None]]) -> None:
    name, location, external = "", None, False
    for field, wire, value in _fields(buf, *span):
        if field == _TENSOR_NAME and wire == 2:
            name = bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
        elif field == _TENSOR_DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
        elif field == _TENSOR_EXTERNAL_DATA:
            key = val = None
            for f2, w2, v2 in _fields(buf, *_sub(buf, field, wire, value)):
                if w2 == 2 and f2 in (_ENTRY_KEY, _ENTRY_VALUE):
                    text = bytes(buf[v2[0] : v2[1]]).decode("utf-8", "replace")
                    key, val = (text, val) if f2 == _ENTRY_KEY else (key, text)
            if key == "location":
                location = val
    if external or location is not None:
        out.append((name, location))


def _sparse(buf, span, out) -> None:
    for field, wire, value in _fields(buf, *span):
        if field in _SPARSE_TENSORS:
            _tensor(buf, _sub(buf, field, wire, value), out)


def _attribute(buf, span, out, depth: int) -> None:
    for field, wire, value in _fields(buf, *span):
        if field in _ATTR_TENSOR:
            _tensor(buf, _sub(buf, field, wire, value), out)
        elif field in _ATTR_GRAPH:
            _graph(buf, _sub(buf, field, wire, value), out, depth + 1)
        elif field in _ATTR_SPARSE:
            _sparse(buf, _sub(buf, field, wire, value), out)


def _node(buf, span, out, depth: int) -> None:
    for field, wire, value in _fields(buf, *span):
        if field == _NODE_ATTRIBUTE:
            _attribute(buf, _sub(buf, field, wire, value), out, depth)


def _graph(buf, span, out, depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise OnnxParseError(f"subgraphs nested more than {_MAX_DEPTH} deep")
    for field, wire, value in _fields(buf, *span):
        if field == _GRAPH_INITIALIZER:
            _tensor(buf, _sub(buf, field, wire, value), out)
        elif field == _GRAPH_SPARSE_INITIALIZER:
            _sparse(buf, _sub(buf, field, wire, value), out)
        elif field == _GRAPH_NODE:
            _node(buf, _sub(buf, field, wire, value), out, depth)


def external_data_locations(data: bytes) -> list[tuple[str, str | None]]:
    """(tensor name, location) of every externally stored tensor in a serialized ``ModelProto``.

    ``location`` is None for a tensor marked EXTERNAL without one (ONNX Runtime refuses such a model too)."""
    buf = memoryview(data)
    out: list[tuple[str, str | None]] = []
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field == _MODEL_GRAPH:
            _graph(buf, _sub(buf, field, wire, value), out, 0)
        elif field == _MODEL_FUNCTIONS:
            for f2, w2, v2 in _fields(buf, *_sub(buf, field, wire, value)):
                if f2 == _FUNCTION_NODE:
                    _node(buf, _sub(buf, f2, w2, v2), out, 0)
                elif f2 == _FUNCTION_ATTRIBUTE_PROTO:
                    _attribute(buf, _sub(buf, f2, w2, v2), out, 0)
        elif field == _MODEL_TRAINING_INFO:
            for f2, w2, v2 in _fields(buf, *_sub(buf, field, wire, value)):
                if f2 in _TRAINING_GRAPHS:
                    _graph(buf, _sub(buf, f2, w2, v2), out, 0)
    return out


_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_RAW_DATA = 1, 2, 9


def initializer_record(data: bytes, suffixes: tuple[str, ...]) -> dict | None:
    """Where the main graph's first initializer whose name ends with one of ``suffixes`` keeps its bytes, without
    reading them: ``{"name", "data_type", "dims", "location", "offset", "length"}``; ``location`` None means the
    bytes are the tensor's ``raw_data`` inside ``data`` itself (``offset`` into it).  None if there is no such
    initializer (or it keeps its values in typed fields instead of raw bytes)."""
    buf = memoryview(data)
    for field, wire, value in _fields(buf, 0, len(buf)):
        if field != _MODEL_GRAPH:
            continue
        for f2, w2, v2 in _fields(buf, *_sub(buf, field, wire, value)):
            if f2 == _GRAPH_INITIALIZER:
                record = _tensor_record(buf, _sub(buf, f2, w2, v2))
                if record["name"].endswith(suffixes) and (record["length"] is not None or record["location"]):
                    return record
    return None


def _tensor_record(buf: memoryview, span: tuple[int, int]) -> dict:
    out = {"name": "", "data_type": 0, "dims": [], "location": None, "offset": 0, "length": None}
    for field, wire, value in _fields(buf, *span):
        if field == _TENSOR_NAME and wire == 2:
            out["name"] = bytes(buf[value[0] : value[1]]).decode("utf-8", "replace")
        elif field == _TENSOR_DATA_TYPE and wire == 0:
            out["data_type"] = value
        elif field == _TENSOR_DIMS and wire == 0:
            out["dims"].append(value)
        elif field == _TENSOR_DIMS and wire == 2:  # packed
            pos = value[0]
            while pos < value[1]:
                dim, pos = _varint(buf, pos, value[1])
                out["dims"].append(dim)
        elif field == _TENSOR_RAW_DATA and wire == 2:
            out["offset"], out["length"] = value[0], value[1] - value[0]
        elif field == _TENSOR_EXTERNAL_DATA:
            entry = {}
            for f2, w2, v2 in _fields(buf, *_sub(buf, field, wire, value)):
                if w2 == 2 and f2 in (_ENTRY_KEY, _ENTRY_VALUE):
                    entry[f2] = bytes(buf[v2[0] : v2[1]]).decode("utf-8", "replace")
            key, val = entry.get(_ENTRY_KEY), entry.get(_ENTRY_VALUE)
            if key == "location":
                out["location"] = val
            elif key in ("offset", "length") and val is not None and val.isdigit():
                out[key] = int(val)
    return out
