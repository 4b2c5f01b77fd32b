"""What the coordinator asks of its members between steps: validation and checkpoints.

These are pure decisions (which steps are due, which member validates which tiers, under which
name a result is reported), kept apart from the coordinator's message loop so that they can be
tested without a run and read in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hetero_testnet.config import shares_model


class _HasTier(Protocol):
    tier: int


@dataclass(frozen=True)
class Due:
    """Work scheduled after a committed step."""

    validate: bool
    checkpoint: bool


def due_after_commit(step: int, total_steps: int, eval_every: int, checkpoint_every: int, *,
                     previous: int | None = None) -> Due:
    """Periodic validation and checkpoints after the commit that brought the run to `step` steps
    from `previous` (default `step - 1`; a diloco round advances several): due when a multiple of
    the interval lies in (previous, step]. The final step is left to the cooldown, which does both."""
    if step >= total_steps:
        return Due(validate=False, checkpoint=False)
    before = step - 1 if previous is None else previous

    def crossed(every: int) -> bool:
        return bool(every) and step // every > before // every

    return Due(validate=crossed(eval_every), checkpoint=crossed(checkpoint_every))


def validation_tiers(intermediate_size: int, requested: Iterable[int], present: Iterable[int]) -> list[int]:
    """The full model, every tier a client trains, and the requested tiers that exist at this width."""
    wanted = {t for t in requested if intermediate_size >> t >= 1}
    return sorted({0} | set(present) | wanted)


def plan_validation(members: Sequence[_HasTier], sync: str, tiers: Sequence[int]) -> list[tuple[Any, list[int]]]:
    """Which member validates which tiers.

    With a shared model the replicas are identical, so the tiers are dealt round-robin and each is
    validated once. Independent replicas (`sync: none`) each validate their own model, at the full
    width and at their own tier.
    """
    if not shares_model(sync):
        return [(m, sorted({0, m.tier})) for m in members]
    plan = [(m, list(tiers[i::len(members)])) for i, m in enumerate(members)] if members else []
    return [(m, mine) for m, mine in plan if mine]


def val_loss_key(result: dict[str, Any], sync: str) -> str:
    """The summary's name for a final validation loss: per tier, or per client and tier for replicas."""
    if shares_model(sync):
        return f"tier{result['tier']}"
    return f"client{result.get('client_id')}_tier{result['tier']}"
