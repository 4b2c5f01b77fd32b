"""The training-sample order: a seeded permutation per epoch (`data/order.py`), the config's
`data_seed`, and what a `SampleDataset` reads with it."""

from __future__ import annotations

import numpy as np
import pytest

from hetero_testnet.config import load_run_config
from hetero_testnet.config.load import parse_run_config
from hetero_testnet.data.order import SampleOrder
from hetero_testnet.data.shards import SampleDataset, write_shard

from conftest import TINY_CONFIG_DIR


def test_each_epoch_is_a_permutation_and_epochs_differ():
    order = SampleOrder(1000, data_seed=3)
    first = [order.stored(j) for j in range(1000)]
    second = [order.stored(j) for j in range(1000, 2000)]
    assert sorted(first) == list(range(1000)) and sorted(second) == list(range(1000))
    assert first != second and first != list(range(1000))


def test_the_same_seed_gives_the_same_order_and_another_seed_another():
    ids = range(0, 2500, 7)
    a, b, c = SampleOrder(900, 5), SampleOrder(900, 5), SampleOrder(900, 6)
    assert [a.stored(j) for j in ids] == [b.stored(j) for j in ids]
    assert [a.stored(j) for j in ids] != [c.stored(j) for j in ids]
    # pinned: seed 5's first epoch over 10 samples as drawn when this was written (CPython 3.11); a
    # change here would silently change every seeded run's data
    assert [SampleOrder(10, 5).stored(j) for j in range(10)] == [9, 6, 8, 0, 5, 2, 1, 4, 3, 7]


def test_no_seed_keeps_the_stored_order_and_ids_wrap():
    order = SampleOrder(7, None)
    assert [order.stored(j) for j in range(15)] == [j % 7 for j in range(15)]
    with pytest.raises(IndexError):
        order.stored(-1)
    with pytest.raises(ValueError):
        SampleOrder(0, 1)


def test_a_dataset_reads_the_sample_its_order_names(tmp_path):
    tokens = np.arange(1, 10 * 4 + 2, dtype=np.int64)      # 10 samples of length 4, distinct tokens
    write_shard(tmp_path / "train_000.bin", tokens)
    plain = SampleDataset([tmp_path / "train_000.bin"], 4, 100)
    shuffled = SampleDataset([tmp_path / "train_000.bin"], 4, 100, data_seed=11)
    for j in range(25):
        assert shuffled.sample(j).tolist() == plain.sample(shuffled.order.stored(j)).tolist()
    assert shuffled.batch(0, 10).tolist() != plain.batch(0, 10).tolist()
    assert sorted(map(tuple, shuffled.batch(0, 10).tolist())) == sorted(map(tuple, plain.batch(0, 10).tolist()))


def test_data_seed_defaults_to_the_seed_and_round_trips_through_the_config():
    cfg = load_run_config(TINY_CONFIG_DIR)
    assert cfg.data_seed is None and cfg.data_order_seed == cfg.seed
    assert "data_seed" not in cfg.to_dict()
    seeded = cfg.replace(seed=4, data_seed=9)
    assert seeded.data_order_seed == 9
    again = parse_run_config(seeded.to_dict(), base_dir=TINY_CONFIG_DIR)
    assert again.seed == 4 and again.data_seed == 9
