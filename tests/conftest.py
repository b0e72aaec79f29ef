"""Fixtures shared by the test modules."""
import pytest

from engine.facemodel import FaceModel


@pytest.fixture(scope="session")
def model() -> FaceModel:
    """The face model from ../shared (or $CAPTURE_FACE_MODEL), loaded once."""
    return FaceModel.load()
