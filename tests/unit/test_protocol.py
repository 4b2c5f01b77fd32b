import pytest

from hetero_testnet.run import protocol as P
from hetero_testnet.errors import ProtocolError


def test_round_trip_every_message_type():
    msgs = [
        P.Hello(token="t", client_id=None, tier=1, helper_fraction=0.5),
        P.Round(step=3, epoch=0, generation=1, sample_start=12, sample_count=4),
        P.Reduced(step=3, generation=1, loss=None, tokens=10, trained_batches=1, ffn_width=512, helper_neurons=0,
                  compute_time_s=1.0, exchange_time_s=0.1, grad_norm=None, nan_inf=True, rss_mb=100.0),
        P.Shutdown(reason="done", status="finished"),
        P.EvalResult(step=2, results=[{"tier": 0, "val_loss": 3.5}]),
    ]
    for m in msgs:
        data = P.encode(m)
        length = P.frame_length(data[:P.HEADER_BYTES])
        assert P.decode_body(data[P.HEADER_BYTES:P.HEADER_BYTES + length]) == m


@pytest.mark.parametrize("body", [
    b'{"v": 2, "type": "ping"}',
    b'{"v": 1, "type": "nope"}',
    b'{"v": 1, "type": "ping", "extra": 1}',
    b'not json',
    b'[1, 2]',
    b'{"v": 1, "type": "round", "step": 1}',
])
def test_bad_messages_are_protocol_errors(body):
    with pytest.raises(ProtocolError):
        P.decode_body(body)


def test_oversized_frames_are_refused_before_reading():
    import struct

    with pytest.raises(ProtocolError):
        P.frame_length(struct.pack(">I", P.MAX_MESSAGE_BYTES + 1))


def test_nan_never_reaches_the_wire():
    assert P.sanitize_float(float("nan")) is None
    assert P.sanitize_float(float("inf")) is None
    assert P.sanitize_float(2.5) == 2.5
