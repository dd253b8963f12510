"""One canonical request path: tricks that mean another path to some server are resolved or refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmproxy.http11.path import InvalidPath, canonical_target, remove_dot_segments

CANONICAL = [
    (b"/v1/chat/completions", b"/v1/chat/completions"),
    (b"/v1//chat/completions", b"/v1/chat/completions"),
    (b"//v1///chat//completions", b"/v1/chat/completions"),
    (b"/v1/./chat/completions", b"/v1/chat/completions"),
    (b"/v1/chat/./completions/.", b"/v1/chat/completions/"),
    (b"/health/../v1/chat/completions", b"/v1/chat/completions"),
    (b"/../../v1/chat/completions", b"/v1/chat/completions"),  # never above the root
    (b"/v1/models/../../api/chat", b"/api/chat"),
    (b"/v1/%63hat/completions", b"/v1/chat/completions"),  # an escaped unreserved letter is that letter
    (b"/%76%31/%63%68%61%74/completions", b"/v1/chat/completions"),
    (b"/%68ealth", b"/health"),
    (b"/api/%7Etags", b"/api/~tags"),
    (b"/a%20b", b"/a%20b"),  # a reserved or other escape stays, upper-cased
    (b"/a%2a", b"/a%2A"),
    (b"/v1/chat/completions/", b"/v1/chat/completions/"),  # a trailing slash is kept
    (b"/", b"/"),
    (b"//", b"/"),
    (b"/.", b"/"),
    (b"/x?q=../a//b%2f", b"/x?q=../a//b%2f"),  # the query is kept as sent
    (b"/v1//chat/completions?stream=1", b"/v1/chat/completions?stream=1"),
    (b"/v1/models/Qwen%2FQwen2.5-7B-Instruct", b"/v1/models/Qwen%2FQwen2.5-7B-Instruct"),  # answered here
    (b"/v1/models/Qwen%2fQwen2.5", b"/v1/models/Qwen%2FQwen2.5"),
]

REFUSED = [
    (b"/v1/%2e%2e/api/chat", "encoded '.'"),
    (b"/health/%2E%2E/v1/chat/completions", "encoded '.'"),
    (b"/v1%2fchat%2fcompletions", "encoded '/'"),
    (b"/v1/chat%2Fcompletions", "encoded '/'"),
    (b"/v1/chat%5ccompletions", "encoded '\\\\'"),
    (b"/v1/chat\\completions", "backslash"),
    (b"/v1/chat/completions%00", "NUL"),
    (b"/v1/chat/completions;jsessionid=1", "';'"),
    (b"/v1;/chat/completions", "';'"),
    (b"/v1/chat/completions#frag", "fragment"),
    (b"/v1/chat/completions?x=1#f", "fragment"),
    (b"/v1/chat/completions%", "malformed"),
    (b"/v1/chat/completions%4", "malformed"),
    (b"/v1/%zzchat", "malformed"),
    (b"/v1/%%41chat", "malformed"),
]


@pytest.mark.parametrize(("target", "canonical"), CANONICAL)
def test_a_target_is_made_canonical(target: bytes, canonical: bytes):
    assert canonical_target(target) == canonical


@pytest.mark.parametrize(("target", "why"), REFUSED)
def test_a_target_without_a_canonical_form_is_refused(target: bytes, why: str):
    with pytest.raises(InvalidPath, match=why):
        canonical_target(target)


def test_a_plain_target_is_the_same_object():
    target = b"/v1/chat/completions?x=1"
    assert canonical_target(target) is target  # no copy on the common path


_SEGMENT = st.sampled_from([b"", b".", b"..", b"v1", b"chat", b"completions", b"%63", b"a%20b"])


@given(st.lists(_SEGMENT, max_size=8))
def test_canonical_is_a_fixed_point_without_dot_or_empty_segments(segments: list[bytes]):
    canonical = canonical_target(b"/" + b"/".join(segments))
    assert canonical_target(canonical) == canonical
    inner = canonical.split(b"/")[1:-1]
    assert canonical.startswith(b"/") and b"//" not in canonical
    assert b"." not in inner and b".." not in inner


@pytest.mark.parametrize(("path", "resolved"), [
    (b"/a/b/c/./../../g", b"/a/g"),  # RFC 3986 §5.2.4's example, for an absolute path
    (b"/mid/content=5/../6", b"/mid/6"),
    (b"/a/..", b"/"),
    (b"/a/b/..", b"/a/"),
])
def test_dot_segments_resolve_as_rfc_3986_says(path: bytes, resolved: bytes):
    assert remove_dot_segments(path) == resolved
