"""Property-based fuzzing of the wire decoder: whatever the frames, decode() returns a
valid message or raises ProtocolError naming the problem — nothing else, ever."""
from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import protocol as p
from tests.unit.shared.test_protocol import SAMPLES

values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**63, max_value=2**64 - 1)
    | st.floats() | st.text(max_size=12) | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=20)


def frames_for(fields: dict, sizes=None, payload=()):
    header = msgspec.msgpack.encode([p.PROTOCOL_VERSION, fields, sizes or []])
    return [header, *payload]


def check(frames):
    try:
        msg = p.decode(frames)
    except p.ProtocolError as e:
        assert str(e)
    else:
        assert isinstance(msg, p.MESSAGES)
        assert p.decode(p.encode(msg, list(msg.frames))) == msg


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_random_bytes_are_refused_cleanly(frames):
    check(frames)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SAMPLES), st.data())
def test_every_message_with_any_field_changed_is_valid_or_refused(sample, data):
    fields = msgspec.to_builtins(sample)
    names = sorted(fields) + ["t", "unknown_field"]
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        if data.draw(st.booleans()) and name in fields:
            del fields[name]
        else:
            fields[name] = data.draw(values)
    sizes = data.draw(st.none() | st.lists(st.integers(0, 8), max_size=2))
    payload = data.draw(st.lists(st.binary(max_size=8), max_size=2))
    check(frames_for(fields, sizes, payload))
