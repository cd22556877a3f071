"""Stop strings over streamed pieces: by hand, and a property over random texts, stops and splits
(nothing at or after a stop string is ever emitted, and the split never changes the result)."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnet158.errors import ConfigError
from bitnet158.stops import StopMatcher


def run(stops, pieces):
    m = StopMatcher(stops)
    out, stopped = [], False
    for piece in pieces:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(m.flush())
    return out, stopped


def test_one_stop_in_one_piece():
    assert run(["END"], ["hello END world"]) == (["hello "], True)


def test_a_stop_spanning_pieces_is_held_back_then_dropped():
    assert run(["bcd"], ["ab", "c", "de"]) == (["a", "", ""], True)


def test_held_text_comes_out_once_it_cannot_be_a_stop():
    assert run(["abc"], ["xab", "d", "ab"]) == (["x", "abd", "", "ab"], False)  # flush at the end
    m = StopMatcher(["abc"])
    assert m.feed("zza") == ("zz", False) and m.flush() == "a" and m.flush() == ""


def test_several_stops_of_different_lengths():
    # the first stop to complete wins: "bc" ends before "abcd" could
    assert run(["abcd", "bc"], ["a", "b", "c", "d"]) == (["", "", "a", ], True)
    # the same in one piece: the split changes nothing
    assert run(["abcd", "bc"], ["abcd"]) == (["a"], True)
    # two ending at the same place: the longer one (its start comes first) is cut
    assert run(["xyz", "yz"], ["wxy", "z"]) == (["w", ""], True)
    m = StopMatcher(["\n\n", "###"])
    assert m.feed("one\n") == ("one", False) and m.feed("two") == ("\ntwo", False)
    assert m.feed("##") == ("", False) and m.feed("#x") == ("", True) and m.matched == "###"
    assert m.feed("more") == ("", True)  # after a stop nothing more comes out


def test_no_stops_passes_everything_and_bad_stops_are_refused():
    assert run([], ["a", "b"]) == (["a", "b", ""], False)
    assert StopMatcher("ab").stops == ("ab",)  # one bare string is one stop
    with pytest.raises(ConfigError, match="empty stop"):
        StopMatcher(["ok", ""])
    with pytest.raises(ConfigError, match="text"):
        StopMatcher([3])  # type: ignore[list-item]


def reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut at the first place any stop string is complete, before the longest one ending there."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[:end - max(map(len, ending))], True
    return text, False


ALPHABET = "ab\né"


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, max_size=24), stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4),
                                                           min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 24), max_size=10))
def test_random_splits_never_leak_and_match_the_reference(text, stops, cuts):
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected, expected_stop = reference(text, stops)
    out, stopped = run(stops, pieces)
    assert "".join(out) == expected and stopped == expected_stop
    emitted = ""
    for piece in out:  # at every moment what is out is a prefix of the answer: nothing to take back
        emitted += piece
        assert expected.startswith(emitted)
    assert not any(s in expected for s in stops)
