from dataclasses import dataclass

import pytest

from hetero_testnet.run.schedule import due_after_commit, plan_validation, val_loss_key, validation_tiers


@dataclass
class FakeMember:
    client_id: int
    tier: int


@pytest.mark.parametrize("step,eval_every,ckpt_every,validate,checkpoint", [
    (16, 16, 0, True, False),
    (17, 16, 0, False, False),
    (8, 0, 4, False, True),
    (12, 4, 6, True, True),
    (64, 16, 16, False, False),  # the final step: the cooldown validates and saves
])
def test_due_after_commit(step, eval_every, ckpt_every, validate, checkpoint):
    due = due_after_commit(step, total_steps=64, eval_every=eval_every, checkpoint_every=ckpt_every)
    assert (due.validate, due.checkpoint) == (validate, checkpoint)


def test_validation_tiers_always_include_the_full_model_and_skip_tiers_narrower_than_one_neuron():
    assert validation_tiers(1024, requested=[], present=[1, 1]) == [0, 1]
    assert validation_tiers(1024, requested=[1, 2], present=[0]) == [0, 1, 2]
    assert validation_tiers(4, requested=[5], present=[0]) == [0]


def test_shared_model_validation_deals_each_tier_to_exactly_one_member():
    members = [FakeMember(1, 0), FakeMember(2, 1), FakeMember(3, 1)]
    plan = plan_validation(members, "allreduce", [0, 1, 2, 3])
    assert [(m.client_id, tiers) for m, tiers in plan] == [(1, [0, 3]), (2, [1]), (3, [2])]
    one_tier = plan_validation(members, "allreduce", [0])
    assert [(m.client_id, tiers) for m, tiers in one_tier] == [(1, [0])]
    assert plan_validation([], "allreduce", [0, 1]) == []


def test_independent_replicas_each_validate_their_own_model_at_full_width_and_their_tier():
    members = [FakeMember(1, 0), FakeMember(2, 1)]
    plan = plan_validation(members, "none", [0, 1, 2])
    assert [(m.client_id, tiers) for m, tiers in plan] == [(1, [0]), (2, [0, 1])]


def test_val_loss_key_names_tiers_or_replicas():
    assert val_loss_key({"tier": 1, "client_id": 3}, "allreduce") == "tier1"
    assert val_loss_key({"tier": 1, "client_id": 3}, "none") == "client3_tier1"
