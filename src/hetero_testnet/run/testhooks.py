"""Test hooks: make a client die at a named point of its work, to aim faults where timing matters.

The launcher's random kills land wherever a client happens to be (mostly in compute). Some
failures need a kill at a moment that lasts milliseconds: while a process group forms, during the
state broadcast to a joiner, inside a collective. A client started with

    HETERO_TESTNET_DIE_AT="forming:0.2,broadcast:0.5"   (point:probability, comma-separated)
    HETERO_TESTNET_DIE_CLIENTS="2,3"                     (optional: only these client ids)

dies, each time it reaches one of the points, with that probability: it exits at once with
`EXIT_TEST_KILL`, a few milliseconds later (uniform in [0, DIE_WITHIN_S], so the death falls inside
the phase), from a timer thread and without any cleanup (`os._exit`: no finalizers, no flush; its
sockets are closed by the kernel, as after a SIGKILL). The launcher restarts a client that exits
with this code, as it restarts the ones it kills. Points: `forming` (inside process-group
formation), `broadcast` (inside the state broadcast, source or receiver), `exchange` (just after
`Go`, inside the collectives), `compute` (in forward/backward). Without the variable nothing happens.
"""

from __future__ import annotations

import logging
import os
import random
import threading

log = logging.getLogger("hetero_testnet")

DIE_AT_ENV = "HETERO_TESTNET_DIE_AT"
DIE_CLIENTS_ENV = "HETERO_TESTNET_DIE_CLIENTS"
EXIT_TEST_KILL = 76
"""Exit code of a client killed by a test hook (the launcher restarts it)."""
DIE_WITHIN_S = 0.015
POINTS = ("forming", "broadcast", "exchange", "compute")


def parse_die_at(text: str) -> dict[str, float]:
    """`forming:0.2,broadcast:1` -> {"forming": 0.2, "broadcast": 1.0}; ValueError on anything else."""
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        point, _, prob = item.partition(":")
        p = float(prob) if prob else 1.0
        if point not in POINTS or not 0.0 <= p <= 1.0:
            raise ValueError(f"{DIE_AT_ENV}: {item!r} is not point:probability with point in {POINTS}")
        out[point] = p
    return out


class DeathHooks:
    """The hooks of one client process (inactive unless the environment asks for them)."""

    def __init__(self, plan: dict[str, float] | None = None, clients: set[int] | None = None,
                 rng: random.Random | None = None) -> None:
        self.plan = plan or {}
        self.clients = clients
        self.client_id: int | None = None
        self.rng = rng or random.Random()

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> DeathHooks:
        env = os.environ if environ is None else environ
        plan = parse_die_at(env.get(DIE_AT_ENV, ""))
        ids = env.get(DIE_CLIENTS_ENV, "").strip()
        clients = {int(x) for x in ids.split(",") if x.strip()} if ids else None
        return cls(plan, clients)

    def at(self, point: str) -> None:
        """Maybe die a few milliseconds from now (see the module docstring)."""
        p = self.plan.get(point, 0.0)
        if p <= 0.0 or (self.clients is not None and self.client_id not in self.clients):
            return
        if self.rng.random() >= p:
            return
        delay = self.rng.uniform(0.0, DIE_WITHIN_S)
        log.warning("test hook: dying at %s in %.1f ms", point, delay * 1000)
        timer = threading.Timer(delay, os._exit, args=(EXIT_TEST_KILL,))
        timer.daemon = True
        timer.start()
