"""Fixtures shared by the test modules."""
import pytest

from engine.facemodel import FaceModel


@pytest.fixture(scope="session")
def model() -> FaceModel:
    """The face model from ../shared (or $CAPTURE_FACE_MODEL), loaded once."""
    return FaceModel.load()


@pytest.fixture
def udp_socket():
    """A UDP socket bound to a free loopback port: a raw receiver of whole datagrams."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


@pytest.fixture
def silent_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound once, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
