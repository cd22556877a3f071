"""Helpers several test modules share (imported as `from common import ...`, like hf_fixtures)."""

from __future__ import annotations

import pytest
import torch

from bitnet158.errors import BitNetError


def one_line(exc: BaseException, *fragments: str) -> str:
    """A user error as the project promises it: a BitNetError whose message is one non-empty line
    holding every fragment."""
    assert isinstance(exc, BitNetError), f"{type(exc).__name__}: {exc}"
    msg = str(exc)
    assert "\n" not in msg and msg.strip(), repr(msg)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices: torch's thread pool only adds wake-up latency (10× slower on a busy 2-core box).
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")` after importing it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
