"""Tests for capture.osc against python-osc's parser and server (an independent decoder)."""
from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_bundle import OscBundle
from pythonosc.osc_message import OscMessage
from pythonosc.osc_server import BlockingOSCUDPServer
from pythonosc.parsing import osc_types

from capture.osc import IMMEDIATE, osc_bundle, osc_message, osc_string


def test_spec_example_bytes():
    # the OSC 1.0 specification's own example message, byte for byte
    expected = bytes.fromhex(
        "2f6f7363696c6c61746f722f342f6672657175656e6379002c660000" "43dc0000")
    assert osc_message("/oscillator/4/frequency", 440.0) == expected


@pytest.mark.parametrize("text, padded", [
    ("", b"\0\0\0\0"), ("a", b"a\0\0\0"), ("abc", b"abc\0"), ("abcd", b"abcd\0\0\0\0"),
])
def test_string_always_terminated_and_padded(text, padded):
    assert osc_string(text) == padded


def test_message_types_decode_with_python_osc():
    data = osc_message("/x/y", "Head", 0.1, -7, True, False, 2**31 - 1, "mouthLowerDownRight")
    assert len(data) % 4 == 0
    msg = OscMessage(data)
    assert msg.address == "/x/y"
    params = msg.params
    assert params[0] == "Head"
    assert params[1] == np.float32(0.1) and params[1] != 0.1  # float32 on the wire
    assert params[2:] == [-7, True, False, 2**31 - 1, "mouthLowerDownRight"]
    assert isinstance(params[2], int) and isinstance(params[1], float)


def test_type_tags_exact():
    data = osc_message("/t", "s", 1.5, 3, True, False)
    assert data[4:12] == b",sfiTF\0\0"  # T and F carry no argument bytes
    assert data[12:] == b"s\0\0\0" + struct.pack(">f", 1.5) + struct.pack(">i", 3)


def test_message_without_arguments_has_bare_type_tag():
    data = osc_message("/VMC/Ext/Blend/Apply")
    assert data == b"/VMC/Ext/Blend/Apply\0\0\0\0,\0\0\0"
    assert OscMessage(data).params == []


def test_numpy_scalars():
    msg = OscMessage(osc_message("/n", np.float32(0.25), np.float64(-2.5), np.int64(9), np.bool_(True)))
    assert msg.params == [0.25, -2.5, 9, True]


def test_unicode_string():
    assert OscMessage(osc_message("/u", "Ké")).params == ["Ké"]


@pytest.mark.parametrize("address, args, error", [
    ("no/slash", (), ValueError),
    ("/a", (None,), TypeError),
    ("/a", (b"blob",), TypeError),
    ("/a", ("nul\0inside",), ValueError),
    ("/a", (2**31,), OverflowError),
    ("/a", (-2**31 - 1,), OverflowError),
])
def test_message_rejects(address, args, error):
    with pytest.raises(error):
        osc_message(address, *args)


def test_bundle_immediate_and_ordered():
    messages = [osc_message("/a", i) for i in range(5)] + [osc_message("/b", "last", 1.0)]
    data = osc_bundle(messages)
    assert data[:8] == b"#bundle\0"
    assert data[8:16] == struct.pack(">Q", IMMEDIATE) == b"\0" * 7 + b"\1"
    bundle = OscBundle(data)
    assert bundle.timestamp == osc_types.IMMEDIATELY
    assert bundle.num_contents == 6
    assert [bundle.content(i).params for i in range(6)] == [[0], [1], [2], [3], [4], ["last", 1.0]]
    # each element: int32 size, then exactly that many bytes
    offset, sizes = 16, []
    while offset < len(data):
        (size,) = struct.unpack(">i", data[offset:offset + 4])
        sizes.append(size)
        offset += 4 + size
    assert offset == len(data) and sizes == [len(m) for m in messages]


def test_bundle_timetag_and_nesting():
    inner = osc_bundle([osc_message("/in", 1)])
    # 2020-01-01T00:00:00Z in NTP seconds, no fraction
    ntp_s = 3786825600
    data = osc_bundle([osc_message("/out", 2), inner], timetag=ntp_s << 32)
    assert data[8:16] == struct.pack(">II", ntp_s, 0)
    bundle = OscBundle(data)
    assert bundle.timestamp == pytest.approx(ntp_s - 2208988800, abs=1e-6)  # as Unix seconds
    assert bundle.content(0).address == "/out"
    assert isinstance(bundle.content(1), OscBundle) and bundle.content(1).content(0).params == [1]


def test_bundle_rejects_bad_input():
    with pytest.raises(ValueError):
        osc_bundle([b"abc"])
    with pytest.raises(ValueError):
        osc_bundle([], timetag=-1)
    assert OscBundle(osc_bundle([])).num_contents == 0


def test_real_udp_to_python_osc_server():
    received, done = [], threading.Event()

    def record(address, *args):
        received.append((address, list(args)))
        if address == "/end":
            done.set()

    dispatcher = Dispatcher()
    dispatcher.set_default_handler(record)
    server = BlockingOSCUDPServer(("127.0.0.1", 0), dispatcher)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        address = server.server_address
        sender.sendto(osc_message("/single", "one", 0.5), address)
        sender.sendto(osc_bundle([osc_message("/b", i) for i in range(3)] + [osc_message("/end", True)]), address)
        assert done.wait(2.0)
    finally:
        sender.close()
        server.shutdown()
        server.server_close()
    assert received == [("/single", ["one", 0.5]), ("/b", [0]), ("/b", [1]), ("/b", [2]), ("/end", [True])]


def test_encoding_is_fast():
    start = time.perf_counter()
    for _ in range(2000):
        osc_message("/VMC/Ext/Blend/Val", "mouthSmileLeft", 0.5)
    assert time.perf_counter() - start < 0.5
