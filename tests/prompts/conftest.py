import pytest

from tests.prompts.tiny import tiny_clip


@pytest.fixture(scope="session")
def tiny_bundle():
    return tiny_clip()
