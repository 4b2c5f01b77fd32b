"""Metrics where researchers look: the run's event stream as W&B and TensorBoard scalars.

`mapping` is the one place that says which event becomes which metric (names, units, x axis);
`sinks` writes them to TensorBoard (through torch's `SummaryWriter`) or W&B (offline without an API
key), each imported only when asked for; `follow` streams a live run's `events.jsonl` to a sink and
replays a finished one. Sits beside `tui` and `experiments`: imports only events, rundir, config and errors.
"""
