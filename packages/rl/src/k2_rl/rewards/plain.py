"""Plain data as JSON text that keeps every type Python's `==` tells apart, and nothing else.

`encode(value) -> str` and `decode(text) -> value` for None, bool, int, float (NaN, infinities,
-0.0), complex, str, bytes, bytearray, list, tuple, set, frozenset and dict (keys of any of
these types). Each value is a JSON list `[tag, payload...]`, so a tuple stays a tuple, `1`,
`1.0` and `True` stay apart and dict keys keep their types. Anything else (a function, an
object with its own `__eq__`) raises PlainDataError: decoded data carries no behaviour.

Standard library only and free of package-relative imports: the `code` reward also runs this
file's source inside the sandbox to encode the answer's results and decode the inputs.
"""

import json

MAX_DEPTH = 200  # deeper data is refused on both sides (the parent's decoder must not recurse)


class PlainDataError(ValueError):
    """The value is not plain data, or the text is not an encoding of plain data."""


def _enc(x, depth):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH}")
    t = type(x)  # type(), not isinstance(): an object may lie about __class__
    if x is None:
        return ["n"]
    if t is bool:
        return ["b", x]
    if issubclass(t, bool):
        raise PlainDataError("bool subclass")
    # subclasses (IntEnum, namedtuple, OrderedDict, ...) are read through the base type's own
    # methods, so what is sent is the plain value the base type compares by
    if issubclass(t, int):
        return ["i", format(int.__index__(x), "#x")]
    if issubclass(t, float):
        return ["f", float.hex(float.__float__(x))]
    if issubclass(t, complex):
        return [
            "c",
            float.hex(complex.__getattribute__(x, "real")),
            float.hex(complex.__getattribute__(x, "imag")),
        ]
    if issubclass(t, str):
        return ["s", str.__str__(x)]
    if issubclass(t, bytes):
        return ["y", bytes.hex(x)]
    if issubclass(t, bytearray):
        return ["Y", bytearray.hex(x)]
    if issubclass(t, tuple):
        return ["t", [_enc(v, depth + 1) for v in tuple.__iter__(x)]]
    if issubclass(t, list):
        return ["l", [_enc(v, depth + 1) for v in list.__iter__(x)]]
    if issubclass(t, frozenset):
        return ["F", [_enc(v, depth + 1) for v in frozenset.__iter__(x)]]
    if issubclass(t, set):
        return ["S", [_enc(v, depth + 1) for v in set.__iter__(x)]]
    if issubclass(t, dict):
        return [
            "d",
            [
                [_enc(k, depth + 1), _enc(dict.__getitem__(x, k), depth + 1)]
                for k in dict.__iter__(x)
            ],
        ]
    raise PlainDataError(f"a {t.__name__} is not plain data")


def encode(value) -> str:
    """The JSON text of plain `value`; PlainDataError for anything that is not plain data."""
    try:
        return json.dumps(_enc(value, 0), separators=(",", ":"))
    except RecursionError:
        raise PlainDataError("nested too deeply") from None
    except ValueError as e:  # int too large to format, or a PlainDataError itself
        raise PlainDataError(str(e)) from None


def _num(text, base):
    if type(text) is not str or len(text) > 100_000:
        raise PlainDataError("bad number")
    return int(text, base) if base else float.fromhex(text)


def _seq(p, depth):
    if type(p) is not list:
        raise PlainDataError("payload is not a list")
    return [_dec(v, depth + 1) for v in p]


def _dec(node, depth):
    if depth > MAX_DEPTH:
        raise PlainDataError(f"nested deeper than {MAX_DEPTH}")
    if type(node) is not list or not node or type(node[0]) is not str:
        raise PlainDataError("not a tagged value")
    tag, rest = node[0], node[1:]
    if tag == "n" and not rest:
        return None
    if len(rest) == 2 and tag == "c":
        return complex(_num(rest[0], 0), _num(rest[1], 0))
    if len(rest) != 1:
        raise PlainDataError(f"bad arity for tag {tag!r}")
    p = rest[0]
    if tag == "b" and type(p) is bool:
        return p
    if tag == "i":
        return _num(p, 16)
    if tag == "f":
        return _num(p, 0)
    if tag == "s" and type(p) is str:
        return p
    if tag in ("y", "Y") and type(p) is str:
        raw = bytes.fromhex(p)
        return raw if tag == "y" else bytearray(raw)
    if tag == "t":
        return tuple(_seq(p, depth))
    if tag == "l":
        return _seq(p, depth)
    if tag == "S":
        return set(_seq(p, depth))
    if tag == "F":
        return frozenset(_seq(p, depth))
    if tag == "d" and type(p) is list:
        out = {}
        for pair in p:
            if type(pair) is not list or len(pair) != 2:
                raise PlainDataError("bad dict item")
            out[_dec(pair[0], depth + 1)] = _dec(pair[1], depth + 1)
        return out
    raise PlainDataError(f"unknown tag {tag!r}")


def decode_node(node):
    """The plain value of an already parsed JSON `node`; PlainDataError for anything else."""
    try:
        return _dec(node, 0)
    except PlainDataError:
        raise
    except (ValueError, TypeError, RecursionError) as e:  # bad hex, unhashable key
        raise PlainDataError(f"{type(e).__name__}: {e}") from None


def decode(text):
    """The plain value that `encode` wrote as `text`; PlainDataError for anything else."""
    try:
        return _dec(json.loads(text), 0)
    except PlainDataError:
        raise
    except (ValueError, TypeError, RecursionError) as e:  # bad JSON, bad hex, unhashable key
        raise PlainDataError(f"{type(e).__name__}: {e}") from None
