import asyncio

import pytest

from hetero_testnet.run import protocol as P
from hetero_testnet.errors import ProtocolError
from hetero_testnet.run.step_metrics import loss_by_tier, witness_line, witness_metrics


def reduced(loss, tokens=1024, compute=1.5, exchange=0.5, **kw):
    fields = dict(step=3, generation=1, loss=loss, tokens=tokens, trained_batches=2, ffn_width=512,
                  helper_neurons=0, compute_time_s=compute, exchange_time_s=exchange, grad_norm=0.7,
                  nan_inf=False, rss_mb=123.0)
    return P.Reduced(**{**fields, **kw})


def test_witness_line_has_the_reference_shape():
    assert witness_line(2, 1, reduced(7.12345)) == (
        "received_witness_metadata client_id=2 matformer_tier=1 step=3 loss=7.1235 tokens_per_sec=512.0")
    assert "loss=nan tokens_per_sec=0.0" in witness_line(2, 1, reduced(None, compute=0.0, exchange=0.0))


def test_witness_metrics_are_the_client_step_fields():
    m = witness_metrics(reduced(7.0), tier=1, epoch=4, lr=1e-3)
    assert m["tier"] == 1 and m["epoch"] == 4 and m["lr"] == 1e-3 and m["ffn_width"] == 512
    assert m["step_time_s"] == 2.0 and m["tokens_per_sec"] == 512.0 and m["grad_norm"] == 0.7


def test_loss_by_tier_means_each_tiers_clients_and_skips_missing_losses():
    got = loss_by_tier({1: reduced(7.0), 2: reduced(6.0), 3: reduced(8.0), 4: reduced(None)},
                       {1: 0, 2: 1, 3: 1, 4: 0})
    assert got == {"0": 7.0, "1": 7.0}
    assert loss_by_tier({1: reduced(None)}, {1: 0}) == {}


def test_read_message_from_an_asyncio_stream():
    async def read(data: bytes):
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await P.read_message(reader)

    frame = P.encode(P.Ping(state="joined"))
    assert asyncio.run(read(frame)) == P.Ping(state="joined")
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(read(frame[:-1]))
    with pytest.raises(ProtocolError):
        asyncio.run(read(b"\xff\xff\xff\xff"))
