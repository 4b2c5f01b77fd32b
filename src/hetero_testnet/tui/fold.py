"""The fold: `apply_event(snapshot, event)` updates a `RunSnapshot` from one event, one handler per event.

Unknown events and missing keys are tolerated (older and newer writers share the format), so a
snapshot can be built from any events file. Every warning or error a handler notices goes to the
snapshot's feed and `problems`.

Client states are *approximations*, because the coordinator reports phases per run, not per client:

- `client_joined` -> waiting (connected, not yet in a generation);
- `generation` -> its members are exchanging (group init and state transfer), other live clients waiting;
- `state` RoundTrain and `client_step` -> training (the coordinator cannot tell compute from all-reduce
  inside a round, so "training" covers both);
- `step_discarded` / `generation_failed` -> the generation's live members wait for the next generation;
- `client_lost` / `fault_kill` -> dead; `client_restarted` -> restarting (until it joins again);
- `run_finished` -> live clients are done (a restart the launcher still makes after it only counts).

`client_step` arrives one step late (after the client applied the committed update), so the per-client
columns lag the header's step counter by one step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from hetero_testnet.events import Event, RunState
from hetero_testnet.tui.snapshot import ERROR, INFO, JOIN, WARN, ClientState, RunSnapshot


def build_snapshot(events: Iterable[dict[str, Any]], *, name: str | None = None) -> RunSnapshot:
    """Fold a sequence of events (e.g. `read_events(path)`) into a fresh snapshot."""
    snap = RunSnapshot(name=name)
    for event in events:
        apply_event(snap, event)
    return snap


def apply_event(snap: RunSnapshot, e: dict[str, Any]) -> None:
    """Fold one event into `snap`. Unknown events and missing keys are tolerated (older/newer writers)."""
    kind = e.get("event")
    ts = _num(e.get("ts")) or snap.last_ts or 0.0
    cid = e.get("client_id")
    snap.events_seen += 1
    snap.last_ts = ts
    if snap.start_ts is None:
        snap.start_ts = ts
    snap.run_id = e.get("run_id") or snap.run_id
    handler = _HANDLERS.get(kind)
    if handler is not None:
        handler(snap, e, ts, cid)


# ---------------------------------------------------------------- per-event handlers

def _on_launch(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    # A new launch in the same directory (a --resume) restarts the clock but keeps the loss history.
    snap.name = e.get("name") or snap.name
    snap.start_ts, snap.finished_ts, snap.status, snap.finish_reason = ts, None, None, None
    snap.state, snap.state_since, snap.paused = RunState.LAUNCHING, ts, False
    snap.first_commit_origin_ts = snap.first_commit_step = snap.last_commit_ts = None
    snap.train_wall_s = 0.0
    snap.clients.clear()
    snap.total_steps = e.get("total_steps", snap.total_steps)
    tiers = e.get("tiers") or []
    snap.say(ts, INFO, f"launch: {e.get('num_clients', len(tiers))} clients, tiers "
                        f"{','.join(str(t) for t in tiers)}")


def _on_run_started(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.total_steps = e.get("total_steps", snap.total_steps)
    if e.get("step"):
        snap.steps_done = e["step"]
    resumed = e.get("resumed_from")
    snap.say(ts, INFO, "coordinator started" + (f", resumed from {resumed}" if resumed else ""))


def _on_state(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    new = e.get("new") or snap.state
    snap.state, snap.state_since = new, ts
    snap.epoch = e.get("epoch", snap.epoch)
    if new == RunState.ROUND_TRAIN:
        snap.set_members_state(snap.members, ClientState.TRAINING)


def _on_client_joined(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is None:
        return
    row = snap.client(cid)
    row.tier = e.get("tier", row.tier)
    row.ffn_width = e.get("ffn_width", row.ffn_width)
    if row.tier is not None and row.ffn_width is not None:
        row.full_width = row.ffn_width << row.tier
    row.helper_fraction = e.get("helper_fraction", row.helper_fraction)
    row.state = ClientState.WAITING
    row.joins += 1
    again = " again" if row.joins > 1 else ""
    snap.say(ts, JOIN, f"client {cid} joined{again}, tier {row.tier}")


def _on_client_lost(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is not None:
        snap.client(cid).state = ClientState.DEAD
    snap.say(ts, WARN, f"client {cid} lost: {e.get('reason', '?')}")


def _on_fault_kill(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is not None:
        row = snap.client(cid)
        row.state, row.kills = ClientState.DEAD, row.kills + 1
    snap.say(ts, WARN, f"fault: {e.get('signal', 'killed')} client {cid}")


def _on_client_restarted(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is not None:
        row = snap.client(cid)
        row.restarts += 1
        if snap.status is None:  # the launcher may restart a killed client while the run shuts down
            row.state = ClientState.RESTARTING
    snap.say(ts, INFO, f"client {cid} restarted")


def _on_client_rejected(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.say(ts, WARN, f"rejected {e.get('peer', '?')}: {e.get('reason', '?')}")


def _on_protocol_error(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.say(ts, WARN, f"protocol error from {e.get('peer', '?')}: {e.get('reason', '?')}")


def _on_generation(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.generation = e.get("generation", snap.generation)
    snap.members = list(e.get("members") or [])
    for row in snap.clients.values():
        if not row.state.is_gone:
            row.state = ClientState.EXCHANGING if row.client_id in snap.members else ClientState.WAITING
    source = e.get("state_source")
    via = f" (state from {source})" if source is not None else ""
    snap.say(ts, INFO, f"generation {snap.generation}: {','.join(map(str, snap.members))}{via}")


def _on_generation_failed(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.set_members_state(snap.members, ClientState.WAITING)
    snap.say(ts, WARN, f"generation {e.get('generation', '?')} failed: {e.get('reason', '?')}")


def _on_step_committed(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    step = e.get("step")
    if step is None:
        return
    wall = _num(e.get("step_wall_s")) or 0.0
    snap.steps_done = step + int(e.get("inner_steps") or 1)  # a diloco round covers several steps
    snap.total_steps = e.get("total_steps", snap.total_steps)
    snap.epoch = e.get("epoch", snap.epoch)
    snap.generation = e.get("generation", snap.generation)
    if e.get("members"):
        snap.members = list(e["members"])
    if snap.first_commit_origin_ts is None:
        snap.first_commit_origin_ts, snap.first_commit_step = ts - wall, step
    snap.last_commit_ts = ts
    snap.train_wall_s += wall
    tokens = int(e.get("tokens") or 0)
    snap.tokens_trained += tokens
    snap.recent_steps.append((tokens, wall))
    for tier, loss in (e.get("loss_by_tier") or {}).items():
        value = _num(loss)
        if value is not None:
            points = snap.loss_by_tier.setdefault(int(tier), [])
            if points and points[-1][0] >= step:  # a resumed run re-commits steps: keep the newest
                while points and points[-1][0] >= step:
                    points.pop()
            points.append((step, value))


def _on_client_step(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    if cid is None:
        return
    row = snap.client(cid)
    if not row.state.is_gone:
        row.state = ClientState.TRAINING
    row.tier = e.get("tier", row.tier)
    if e.get("ffn_width") is not None:
        row.ffn_width = e["ffn_width"]
        if row.tier is not None:
            row.full_width = row.ffn_width << row.tier
    row.helper_neurons = e.get("helper_neurons", row.helper_neurons)
    row.last_loss = _num(e.get("loss"))
    row.step_time_s = _num(e.get("step_time_s"))
    row.tokens_per_sec = _num(e.get("tokens_per_sec"))
    row.rss_mb = _num(e.get("rss_mb"), row.rss_mb)
    busy, wait, exchange = _num(e.get("compute_time_s")), _num(e.get("wait_s")), _num(e.get("exchange_time_s"))
    if busy is not None and wait is not None and exchange is not None:  # events before issue 12 lack wait_s
        busy += _num(e.get("emulated_s")) or 0.0
        row.busy_s += busy
        row.round_s += busy + wait + exchange
    sent = _num(e.get("bytes_sent"))
    if sent is not None:
        row.sent_mb_per_step = sent / max(1, int(e.get("inner_steps") or 1)) / 1e6
    row.last_step = e.get("step")
    if e.get("nan_inf"):
        snap.say(ts, WARN, f"client {cid}: non-finite loss/gradient at step {e.get('step')}")


def _on_step_discarded(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.discarded_steps += 1
    snap.set_members_state(snap.members, ClientState.WAITING)
    snap.say(ts, WARN, f"step {e.get('step')} discarded: {e.get('reason', '?')}")


def _on_replica_mismatch(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    sums = e.get("checksums") or {}
    detail = ", ".join(f"{c}={str(s)[:8]}" for c, s in sorted(sums.items()))
    snap.say(ts, ERROR, f"replicas differ after step {e.get('step')}: {detail}")


def _on_eval(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    tier, loss = e.get("tier"), _num(e.get("val_loss"))
    if tier is None or loss is None:
        return
    step = int(e.get("step") or 0)
    snap.val_loss[int(tier)] = (step, loss)
    line = snap.eval_lines.get(step)
    if line is None or not any(item is line[0] for item in snap.feed):
        snap.say(ts, INFO, "")
        line = snap.eval_lines[step] = (snap.feed[-1], {})
        for old in sorted(snap.eval_lines)[:-4]:  # evals of a step arrive close together
            del snap.eval_lines[old]
    line[1][int(tier)] = loss
    line[0].text = f"val loss @{step}: " + " ".join(f"t{t} {v:.3f}" for t, v in sorted(line[1].items()))


def _on_checkpoint_saved(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.say(ts, INFO, f"checkpoint at step {e.get('step')}: {e.get('path', '?')}")


def _on_epoch(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.epoch = e.get("epoch", snap.epoch)
    snap.say(ts, INFO, f"epoch {snap.epoch}")


def _on_pause(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.paused = e.get("event") == Event.PAUSE
    what = "pause requested (holds at the next step boundary)" if snap.paused else "resumed"
    snap.say(ts, INFO, what)


def _on_run_finished(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    snap.status = e.get("status") or "finished"
    snap.finish_reason = e.get("reason")
    snap.finished_ts = ts
    snap.paused = False
    snap.steps_done = e.get("steps_completed", snap.steps_done)
    snap.total_steps = e.get("total_steps", snap.total_steps)
    snap.set_members_state(list(snap.clients), ClientState.DONE)
    level = {"finished": INFO, "interrupted": WARN}.get(snap.status, ERROR)
    if snap.status == "interrupted" and e.get("stop_requested"):
        level = INFO  # stopped as asked (q, Ctrl-C, --exit-after-secs): not a problem to report
    snap.say(ts, level, f"run {snap.status}: {snap.finish_reason or ''}".rstrip(": "))
    if e.get("replicas_identical") is False:
        snap.say(ts, ERROR, "replicas were not bit-identical at the end")


def _on_shares(snap: RunSnapshot, e: dict[str, Any], ts: float, cid: Any) -> None:
    counts = e.get("counts") if isinstance(e.get("counts"), dict) else {}
    split = " ".join(f"{c}:{n}" for c, n in counts.items())
    snap.say(ts, INFO, f"shares ({e.get('mode')}) at step {e.get('step')}: {split} sequences")


_Handler = Callable[[RunSnapshot, dict[str, Any], float, Any], None]
_HANDLERS: dict[str, _Handler] = {
    Event.LAUNCH: _on_launch,
    Event.RUN_STARTED: _on_run_started,
    Event.STATE: _on_state,
    Event.CLIENT_JOINED: _on_client_joined,
    Event.CLIENT_LOST: _on_client_lost,
    Event.FAULT_KILL: _on_fault_kill,
    Event.CLIENT_RESTARTED: _on_client_restarted,
    Event.CLIENT_REJECTED: _on_client_rejected,
    Event.PROTOCOL_ERROR: _on_protocol_error,
    Event.GENERATION: _on_generation,
    Event.GENERATION_FAILED: _on_generation_failed,
    Event.STEP_COMMITTED: _on_step_committed,
    Event.SHARES: _on_shares,
    Event.CLIENT_STEP: _on_client_step,
    Event.STEP_DISCARDED: _on_step_discarded,
    Event.REPLICA_MISMATCH: _on_replica_mismatch,
    Event.EVAL: _on_eval,
    Event.CHECKPOINT_SAVED: _on_checkpoint_saved,
    Event.EPOCH: _on_epoch,
    Event.PAUSE: _on_pause,
    Event.RESUME: _on_pause,
    Event.RUN_FINISHED: _on_run_finished,
}


def _num(value: Any, default: float | None = None) -> float | None:
    """A finite float, or `default` (JSON may carry null, NaN or a string)."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        return default
    return f if f == f and f not in (float("inf"), float("-inf")) else default
