"""Open Sound Control 1.0 encoding: the messages and bundles the VMC and VRChat streams send.

Only what those streams need is written: arguments of type string (``s``),
float32 (``f``), int32 (``i``) and the argument-less booleans (``T``/``F``);
every number is big-endian and every part is padded with NULs to a multiple
of 4 bytes, as the OSC 1.0 specification requires. Decoding is left to the
receivers (the tests use python-osc's parser as an independent check).
"""
from __future__ import annotations

import numbers
import struct

import numpy as np

#: The OSC time tag that means "apply on arrival" (NTP seconds 0, fraction 1).
IMMEDIATE = 1

_BUNDLE_TAG = b"#bundle\x00"


def osc_string(text: str) -> bytes:
    """UTF-8 text, a NUL terminator, then NULs up to a multiple of 4 bytes."""
    data = text.encode("utf-8")
    if b"\x00" in data:
        raise ValueError(f"an OSC string cannot hold a NUL character: {text!r}")
    return data + b"\x00" * (4 - len(data) % 4)


def osc_message(address: str, *args) -> bytes:
    """One OSC message: address, type tag string, then the arguments.

    str -> ``s``, bool -> ``T``/``F`` (no argument bytes), integers -> ``i``
    (int32), other real numbers -> ``f`` (float32, so 0.1 arrives as
    0.100000001). numpy scalars are accepted; anything else is a TypeError.
    """
    if not address.startswith("/"):
        raise ValueError(f"an OSC address starts with '/': {address!r}")
    tags, payload = [","], []
    for arg in args:
        if isinstance(arg, str):
            tags.append("s")
            payload.append(osc_string(arg))
        elif isinstance(arg, (bool, np.bool_)):  # before int: bool is an int
            tags.append("T" if arg else "F")
        elif isinstance(arg, numbers.Integral):
            if not -2**31 <= int(arg) < 2**31:
                raise OverflowError(f"OSC int32 argument out of range: {arg}")
            tags.append("i")
            payload.append(struct.pack(">i", int(arg)))
        elif isinstance(arg, numbers.Real):
            tags.append("f")
            payload.append(struct.pack(">f", float(arg)))
        else:
            raise TypeError(f"no OSC type for {type(arg).__name__} argument {arg!r}")
    return osc_string(address) + osc_string("".join(tags)) + b"".join(payload)


def osc_bundle(messages, timetag: int = IMMEDIATE) -> bytes:
    """``#bundle``, a 64-bit NTP time tag, then each element (a message or a
    bundle) prefixed by its int32 size. The default time tag asks the
    receiver to apply the contents on arrival."""
    if not 0 <= timetag < 2**64:
        raise ValueError(f"OSC time tag must fit 64 unsigned bits, got {timetag}")
    parts = [_BUNDLE_TAG, struct.pack(">Q", timetag)]
    for element in messages:
        if len(element) % 4:
            raise ValueError(f"OSC bundle element of {len(element)} bytes is not a multiple of 4")
        parts.append(struct.pack(">i", len(element)))
        parts.append(bytes(element))
    return b"".join(parts)
