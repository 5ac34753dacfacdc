"""OCI references face untrusted text (command lines, CI variables): any string either parses into a reference that
prints back to itself, or raises RegistryError; never another exception."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from builder.errors import RegistryError
from builder.publish.reference import parse_reference

MAX_EXAMPLES = 500
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PIECES = st.sampled_from(["oci://", "127.0.0.1", ":5000", ":0", ":99999", ":", "/", "//", "@", "sha256:", "a" * 64,
                          "0" * 64, "team", "Team", "_", "__", "-", ".", "..", "[::1]", "localhost", "tag", ":v1",
                          "registry.example.com", "é", " ", "\x00", "x" * 130])
ALPHABET = st.text(alphabet="oci:/@.-_[]0123456789abcdefABCDEFsha", max_size=60)


def check(text: str, **kw) -> None:
    try:
        ref = parse_reference(text, **kw)
    except RegistryError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert str(ref) == text, (str(ref), text)
    assert parse_reference(str(ref), **kw) == ref


@FUZZ
@given(st.lists(PIECES, max_size=8).map("".join), st.booleans(), st.booleans())
def test_assembled_references_parse_or_raise_registry_error(text, require_tag, allow_digest):
    check(text, require_tag=require_tag, allow_digest=allow_digest)


@FUZZ
@given(ALPHABET.map(lambda s: "oci://" + s))
def test_random_reference_text_parses_or_raises_registry_error(text):
    check(text)


@FUZZ
@given(st.text(max_size=80))
def test_any_unicode_parses_or_raises_registry_error(text):
    check(text)

