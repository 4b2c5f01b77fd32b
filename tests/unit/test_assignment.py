from hetero_testnet.run.assignment import assign_samples


def test_reference_split_rule():
    ranges = assign_samples([1, 2, 3], 14, 100, seed=7, step=3)
    counts = sorted(r.count for r in ranges.values())
    assert counts == [4, 5, 5]
    spans = sorted((r.start, r.start + r.count) for r in ranges.values())
    assert spans[0][0] == 100 and spans[-1][1] == 114
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, disjoint


def test_deterministic_and_seed_dependent():
    a = assign_samples([1, 2, 3, 4], 12, 0, seed=1, step=5)
    assert a == assign_samples([4, 3, 2, 1], 12, 0, seed=1, step=5)
    orders = {tuple(sorted(assign_samples([1, 2, 3, 4], 12, 0, seed=1, step=s).items(),
                           key=lambda kv: kv[1].start)) for s in range(10)}
    assert len(orders) > 1  # the order is shuffled per step


def test_more_clients_than_sequences():
    ranges = assign_samples([1, 2, 3], 2, 0, seed=0, step=0)
    assert sorted(r.count for r in ranges.values()) == [0, 1, 1]
