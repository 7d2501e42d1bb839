"""Protocol payloads: pickle-free codec, strict decoding."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from medimesh.errors import MalformedPayload
from medimesh.protocol import (
    MESSAGE_TYPES,
    Update,
    Verdict,
    Verdicts,
    decode,
    decode_arrays,
    encode_arrays,
)


def _update() -> Update:
    rng = np.random.default_rng(0)
    return Update(
        round=2,
        base_hash="ab" * 32,
        n_examples=17,
        delta_w=rng.normal(size=(5, 3)).astype(np.float32),
        delta_b=rng.normal(size=3).astype(np.float32),
        eval={"n_examples": 4, "correct_top1": 2, "correct_top3": 4, "loss_sum": 1.5},
    )


def test_update_round_trips_exactly() -> None:
    """Arrays keep dtype, shape and bits; scalars and dicts survive."""
    u = _update()
    back = decode(Update.TYPE, u.to_payload(), Update)
    assert back.round == 2 and back.n_examples == 17 and back.base_hash == u.base_hash
    assert back.delta_w.dtype == np.float32 and back.delta_w.shape == (5, 3)
    assert np.array_equal(back.delta_w, u.delta_w) and np.array_equal(back.delta_b, u.delta_b)
    assert back.eval == u.eval


def test_verdict_batch_round_trips() -> None:
    """A batch of verdicts decodes back into typed Verdict objects."""
    items = [Verdict(1, "d" * 64, "h" * 64, False, ("replay",), {"norm": 1.0})]
    back = decode(Verdicts.TYPE, Verdicts(1, items).to_payload(), Verdicts)
    assert back.items == items


def test_payload_is_json_plus_raw_bytes() -> None:
    """The codec writes JSON meta and raw little-endian floats — no pickle anywhere."""
    payload = _update().to_payload()
    (hlen,) = struct.unpack_from(">I", payload, 0)
    assert payload[4 : 4 + hlen].startswith(b"{")
    assert b"\x80\x04\x95" not in payload


@pytest.mark.parametrize(
    "mutate",
    [
        lambda p: p[:-1],  # truncated array
        lambda p: p + b"\0",  # trailing bytes
        lambda p: b"\xff\xff\xff\xff" + p[4:],  # meta length out of range
        lambda p: p[:4] + b"[" + p[5:],  # meta is not JSON
    ],
)
def test_malformed_payloads_raise(mutate: object) -> None:
    """Every inconsistency is a MalformedPayload, never an IndexError or a silent pass."""
    payload = _update().to_payload()
    with pytest.raises(MalformedPayload):
        Update.from_payload(mutate(payload))  # type: ignore[operator]


def test_wrong_field_types_are_refused() -> None:
    """A string where an int belongs, or a missing field, is refused."""
    good = _update()
    meta = {"round": "2", "base_hash": good.base_hash, "n_examples": 17, "eval": {}}
    arrays = {"delta_w": good.delta_w, "delta_b": good.delta_b}
    with pytest.raises(MalformedPayload, match="round"):
        Update.from_payload(encode_arrays(meta, arrays))
    meta["round"] = 2
    del meta["eval"]
    with pytest.raises(MalformedPayload, match="eval"):
        Update.from_payload(encode_arrays(meta, arrays))


def test_unsupported_dtype_and_wrong_type_are_refused() -> None:
    """Object arrays cannot be encoded; a payload claiming another type is refused."""
    with pytest.raises(MalformedPayload):
        encode_arrays({}, {"x": np.array(["a"], dtype=object)})
    with pytest.raises(MalformedPayload):
        decode("verdicts", _update().to_payload(), Update)
    meta, arrays = decode_arrays(encode_arrays({"a": 1}, {"x": np.arange(3, dtype="<i8")}))
    assert meta == {"a": 1} and arrays["x"].tolist() == [0, 1, 2]
    assert set(MESSAGE_TYPES) >= {"update", "verdicts", "round_start", "setup_stats"}
