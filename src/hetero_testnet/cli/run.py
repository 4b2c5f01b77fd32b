"""`testnet start`, `testnet coordinator`, `testnet client`: the testnet's commands.

`start` spawns exactly the two other commands; they exist so that clients can join a run from
other machines (`testnet client --coordinator HOST:PORT --tier T` with the run's token in
HETERO_TESTNET_TOKEN or a `--token-file`). The token never appears on a command line.
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from hetero_testnet.config import DEFAULT_CONFIG, DIRECTORY_NAME, RunConfig, load_run_config
from hetero_testnet.errors import ConfigError


# ----------------------------------------------------------------- parsing helpers

def parse_int_list(text: str | None, option: str) -> list[int]:
    if text is None or not text.strip():
        return []
    values = []
    for item in text.split(","):
        item = item.strip()
        try:
            values.append(int(item))
        except ValueError:
            raise ConfigError(f"{option} must be comma-separated integers (got {item!r} in {text!r})") from None
    return values


def parse_float_list(text: str | None, option: str) -> list[float]:
    if text is None or not text.strip():
        return []
    values = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise ConfigError(f"{option} must be comma-separated numbers (got {item.strip()!r})") from None
        if not math.isfinite(v):
            raise ConfigError(f"{option} values must be finite (got {item.strip()!r})")
        values.append(v)
    return values


def cycle(values: list, i: int, default):
    """The reference's rule: empty -> default; otherwise client i gets values[i % len(values)]."""
    return values[i % len(values)] if values else default


def parse_latency(text: str | None) -> tuple[float, float]:
    """`base[-jitter]` in milliseconds."""
    if not text:
        return 0.0, 0.0
    parts = text.split("-")
    try:
        base = float(parts[0])
        jitter = float(parts[1]) if len(parts) > 1 else 0.0
    except (ValueError, IndexError):
        raise ConfigError(f"--fault-latency-ms must be BASE or BASE-JITTER in ms (got {text!r})") from None
    if len(parts) > 2 or base < 0 or jitter < 0:
        raise ConfigError(f"--fault-latency-ms must be BASE or BASE-JITTER, both >= 0 (got {text!r})")
    return base, jitter


def read_token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read --token-file {token_file}: {e.strerror}") from e
    else:
        token = os.environ.get("HETERO_TESTNET_TOKEN", "").strip()
    if not token:
        raise ConfigError("no run token: set HETERO_TESTNET_TOKEN or pass --token-file",
                          hint="`testnet start` writes it to logs/<name>/.token (mode 0600)")
    return token


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--coordinator must be HOST:PORT (got {text!r})")
    try:
        return host, int(port)
    except ValueError:
        raise ConfigError(f"--coordinator port must be an integer (got {port!r})") from None


def load_config_with_overrides(config_path: Path, *, seed: int | None, total_steps: int | None) -> RunConfig:
    cfg = load_run_config(config_path)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if total_steps is not None:
        cfg = cfg.with_total_steps(total_steps)
    return cfg


def check_choice(value: str, choices: tuple[str, ...], option: str) -> str:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)} (got {value!r})")
    return value


def resolve_device(device: str) -> str:
    check_choice(device, ("auto", "cpu", "cuda", "mps"), "--device")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device mps but MPS is not available")
    return device


# ----------------------------------------------------------------- headless progress

class HeadlessProgress:
    """One concise line per committed step, plus warnings, from the event stream."""

    def __init__(self, stream=None) -> None:
        self.stream = stream or sys.stdout
        self.t0: float | None = None
        self.first_step: int | None = None

    def __call__(self, e: dict[str, Any]) -> None:
        kind = e.get("event")
        line = None
        if kind == "step_committed":
            step, total = e["step"] + 1, e.get("total_steps") or 0
            now = e["ts"]
            if self.t0 is None:
                self.t0, self.first_step = now - e.get("step_wall_s", 0.0), e["step"]
            done = step - self.first_step
            rate = (now - self.t0) / done if done else 0.0
            eta = max(0.0, (total - step) * rate)
            losses = " ".join(f"t{t}={v:.4f}" for t, v in e.get("loss_by_tier", {}).items())
            line = (f"step {step}/{total} | train loss {losses} | {e.get('tokens_per_sec', 0):,.0f} tok/s | "
                    f"ETA {_fmt_duration(eta)}")
        elif kind in ("client_lost", "step_discarded", "fault_kill", "client_restarted", "replica_mismatch",
                      "client_rejected", "generation"):
            detail = e.get("reason") or e.get("members") or e.get("pid") or ""
            who = f" client {e['client_id']}" if e.get("client_id") is not None else ""
            line = f"{kind}{who}: {detail}" if kind != "generation" or e.get("generation", 0) > 0 else None
        elif kind == "eval":
            line = f"val loss (step {e['step']}, tier {e['tier']}, {e['num_samples']} seqs): {e['val_loss']:.4f}"
        elif kind == "run_finished":
            line = f"run {e['status']}: {e['reason']}"
        if line:
            print(line, file=self.stream, flush=True)


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _check_data(cfg: RunConfig) -> None:
    """Open both splits once before spawning anything, so bad data is a one-line error up front."""
    from hetero_testnet.data.shards import open_split

    for split in ("train", "val"):
        open_split(cfg.data, split, cfg.model.max_seq_len, cfg.model.vocab_size)


def default_run_name(tiers: list[int]) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"tiers-{'-'.join(map(str, tiers))}-{stamp}"


# ----------------------------------------------------------------- commands

def register(app: typer.Typer) -> None:
    app.command("start")(start)
    app.command("coordinator")(coordinator)
    app.command("client")(client)


def start(
    num_clients: Annotated[int, typer.Option("--num-clients", "-n", help="Client processes to spawn.")] = 3,
    config_path: Annotated[Path, typer.Option("--config-path", "-c",
                                              help="Config directory (config.yaml or Psyche state.toml) or file.")
                           ] = DEFAULT_CONFIG,
    tiers: Annotated[Optional[str], typer.Option("--tiers", "--client-matformer-tiers",
                                                 help="MatFormer tier per client, e.g. 0,1,1 (cycles; default 0).")
                     ] = None,
    helper_fractions: Annotated[Optional[str], typer.Option(
        "--helper-fractions", "--client-matformer-helper-fractions",
        help="Helper-neuron fraction per client in [0,1] (cycles; default 0).")] = None,
    helper_rotation_intervals: Annotated[Optional[str], typer.Option(
        "--helper-rotation-intervals", "--client-matformer-helper-rotation-intervals",
        help="Steps between helper re-draws per client (cycles; default 16).")] = None,
    headless: Annotated[bool, typer.Option("--headless", help="Plain progress lines instead of the dashboard.")
                        ] = False,
    tui: Annotated[Optional[bool], typer.Option("--tui/--no-tui",
                                                help="Full-screen dashboard (default: on a TTY).")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Run name: logs go to <logs-dir>/<name>/ "
                                                "(default: tiers + UTC time).")] = None,
    logs_dir: Annotated[Path, typer.Option("--logs-dir", help="Parent directory of run logs.")] = Path("logs"),
    seed: Annotated[Optional[int], typer.Option("--seed", help="Run seed (initial weights, data order); "
                                                "default from the config.")] = None,
    total_steps: Annotated[Optional[int], typer.Option("--total-steps", help="Override config total_steps "
                                                       "(the LR schedule follows).")] = None,
    exit_after_secs: Annotated[Optional[float], typer.Option(
        "--exit-after-secs", "--headless-exit-after-secs",
        help="Safety cap: end the run cleanly as 'interrupted' after this many seconds.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")] = "auto",
    server_port: Annotated[int, typer.Option("--server-port", help="Coordinator port (0 = any free port).")
                           ] = 20000,
    bind: Annotated[str, typer.Option("--bind", help="Coordinator address; 0.0.0.0 lets other machines join "
                                      "(they still need the run token).")] = "127.0.0.1",
    sync: Annotated[str, typer.Option("--sync", help="allreduce (one shared model) | none (independent replicas: "
                                      "the reference's AdamW behaviour, for ablations only).")] = "allreduce",
    min_clients: Annotated[Optional[int], typer.Option("--min-clients", help="Override the config's "
                                                       "min_clients and init_min_clients.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="Torch threads per client "
                                                   "(default: cores // clients, at least 1).")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Save a resumable checkpoint every "
                                                  "K steps (0 = only the final one).")] = 0,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue logs/<name> from its latest "
                                                   "checkpoint.")] = None,
    random_kill_num: Annotated[int, typer.Option("--random-kill-num", help="Clients to SIGKILL every interval."
                                                 )] = 0,
    random_kill_interval: Annotated[float, typer.Option("--random-kill-interval", help="Seconds between kills."
                                                        )] = 120.0,
    allowed_to_kill: Annotated[Optional[str], typer.Option("--allowed-to-kill", help="Client ids eligible "
                                                           "for kills, e.g. 1,2 (default: all).")] = None,
    kill_restart_delay: Annotated[float, typer.Option("--kill-restart-delay", help="Seconds before a killed "
                                                      "client is restarted with the same id.")] = 1.0,
    fault_latency_ms: Annotated[Optional[str], typer.Option("--fault-latency-ms", help="Added to each client's "
                                                            "exchange: BASE or BASE-JITTER ms.")] = None,
    fault_bandwidth_limit: Annotated[float, typer.Option("--fault-bandwidth-limit", help="Bytes/s cap applied "
                                                         "to each client's exchange (0 = none).")] = 0.0,
) -> None:
    """Start a coordinator and N clients and train one shared model at mixed MatFormer tiers."""
    from hetero_testnet.run.launcher import ClientSpec, FaultPlan, LaunchPlan, Launcher
    from hetero_testnet.model.matformer import ffn_width

    if num_clients < 1:
        raise ConfigError(f"--num-clients must be >= 1 (got {num_clients})")
    check_choice(sync, ("allreduce", "none"), "--sync")
    if server_port < 0 or server_port > 65535:
        raise ConfigError(f"--server-port must be in 0..65535 (got {server_port})")
    tier_list = parse_int_list(tiers, "--tiers")
    fractions = parse_float_list(helper_fractions, "--helper-fractions")
    intervals = parse_int_list(helper_rotation_intervals, "--helper-rotation-intervals")
    for f in fractions:
        if not 0.0 <= f <= 1.0:
            raise ConfigError(f"--helper-fractions values must be in [0, 1] (got {f:g})")
    for i in intervals:
        if i < 1:
            raise ConfigError(f"--helper-rotation-intervals values must be >= 1 (got {i})")
    run_dir: Path
    resume_ckpt = None
    if resume is not None:
        from hetero_testnet.model.checkpoint import latest_checkpoint

        run_dir = resume
        if not (resume / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume} is not a run directory (no config.yaml)")
        resume_ckpt = latest_checkpoint(resume)
        cfg = load_config_with_overrides(resume / "config.yaml", seed=None, total_steps=total_steps)
    else:
        cfg = load_config_with_overrides(config_path, seed=seed, total_steps=total_steps)
    specs = []
    for i in range(num_clients):
        tier = cycle(tier_list, i, 0)
        ffn_width(cfg.model.intermediate_size, tier)
        specs.append(ClientSpec(client_id=i + 1, tier=tier, helper_fraction=cycle(fractions, i, 0.0),
                                rotation_interval=cycle(intervals, i, 16)))
    need = min_clients if min_clients is not None else cfg.timing.init_min_clients
    if min_clients is not None and min_clients < 1:
        raise ConfigError(f"--min-clients must be >= 1 (got {min_clients})")
    if num_clients < need:
        raise ConfigError(f"--num-clients {num_clients} is below the config's init_min_clients {need}",
                          hint="add clients, or pass --min-clients to override")
    if resume is None:
        if name is not None and not DIRECTORY_NAME.match(name):
            raise ConfigError(f"--name {name!r} must be one directory name: letters, digits, '.', '_', '+', '-'",
                              hint="logs go to <logs-dir>/<name>/; use --logs-dir to write elsewhere")
        run_dir = logs_dir / (name or default_run_name([s.tier for s in specs]))
        if (run_dir / "summary.json").exists():
            raise ConfigError(f"run directory {run_dir} already holds a finished run",
                              hint="choose another --name, or --resume it")
    _check_data(cfg)
    latency, jitter = parse_latency(fault_latency_ms)
    if fault_bandwidth_limit < 0:
        raise ConfigError("--fault-bandwidth-limit must be >= 0")
    killable = parse_int_list(allowed_to_kill, "--allowed-to-kill")
    for k in killable:
        if not 1 <= k <= num_clients:
            raise ConfigError(f"--allowed-to-kill names client {k}, but clients are 1..{num_clients}")
    if random_kill_num < 0 or random_kill_interval <= 0 or kill_restart_delay < 0:
        raise ConfigError("--random-kill-num must be >= 0, --random-kill-interval > 0, --kill-restart-delay >= 0")
    if exit_after_secs is not None and exit_after_secs <= 0:
        raise ConfigError("--exit-after-secs must be > 0")
    dev = resolve_device(device)
    cores = os.cpu_count() or 1
    per_client = threads if threads is not None else max(1, cores // num_clients)
    if per_client < 1:
        raise ConfigError("--threads must be >= 1")
    plan = LaunchPlan(
        run_dir=run_dir, config=cfg, clients=specs, sync=sync, bind=bind, server_port=server_port, device=dev,
        threads_per_client=per_client, exit_after_s=exit_after_secs, min_clients=min_clients,
        checkpoint_every=checkpoint_every, resume_checkpoint=resume_ckpt,
        faults=FaultPlan(random_kill_num=random_kill_num, random_kill_interval_s=random_kill_interval,
                         allowed_to_kill=killable, kill_restart_delay_s=kill_restart_delay,
                         latency_ms=latency, latency_jitter_ms=jitter, bandwidth_bytes_per_s=fault_bandwidth_limit,
                         seed=cfg.seed),
        command_line=shlex.join(["testnet", *sys.argv[1:]]))
    use_tui = (tui if tui is not None else sys.stdout.isatty()) and not headless
    if use_tui:
        from hetero_testnet.tui.live import run_with_dashboard

        code = run_with_dashboard(Launcher, plan)
    else:
        print(f"run {run_dir.name}: {num_clients} clients, tiers {','.join(str(s.tier) for s in specs)}, "
              f"{cfg.timing.total_steps} steps, logs in {run_dir}/", flush=True)
        code = Launcher(plan, on_event=HeadlessProgress()).run()
    raise typer.Exit(code)


def coordinator(
    config_path: Annotated[Path, typer.Option("--config-path", "-c", help="Config directory or file.")
                           ] = DEFAULT_CONFIG,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where events.jsonl, summary.json and the final "
                                          "checkpoint go.")] = Path("logs/coordinator"),
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on.")] = "127.0.0.1",
    server_port: Annotated[int, typer.Option("--server-port", help="Port (0 = any free port).")] = 20000,
    expect_clients: Annotated[int, typer.Option("--expect-clients", help="Start as soon as this many clients "
                                                "joined (0 = config's init_min_clients plus its extra time).")
                              ] = 0,
    sync: Annotated[str, typer.Option("--sync", help="allreduce | none.")] = "allreduce",
    device: Annotated[str, typer.Option("--device", help="Clients' device: decides gloo (cpu) or nccl (cuda).")
                      ] = "cpu",
    min_clients: Annotated[Optional[int], typer.Option("--min-clients", help="Override min_clients.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every K steps.")] = 0,
    resume_checkpoint: Annotated[Optional[Path], typer.Option("--resume-checkpoint",
                                                              help="Start from this checkpoint.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Override the config's seed.")] = None,
    total_steps: Annotated[Optional[int], typer.Option("--total-steps", help="Override total_steps.")] = None,
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="File holding the run token "
                                                       "(else HETERO_TESTNET_TOKEN).")] = None,
    fault_latency_ms: Annotated[Optional[str], typer.Option("--fault-latency-ms", help="BASE[-JITTER] ms added "
                                                            "to every client's exchange.")] = None,
    fault_bandwidth_limit: Annotated[float, typer.Option("--fault-bandwidth-limit",
                                                         help="Bytes/s cap for every client's exchange.")] = 0.0,
    listen_fd: Annotated[Optional[int], typer.Option("--listen-fd", hidden=True,
                                                     help="Inherited listening socket (used by start).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run the coordinator (control plane) of one run."""
    from hetero_testnet.run.coordinator import CoordinatorOptions, run_coordinator
    from hetero_testnet.events import setup_logging

    cfg = load_config_with_overrides(config_path, seed=seed, total_steps=total_steps)
    check_choice(sync, ("allreduce", "none"), "--sync")
    token = read_token(token_file)
    latency, jitter = parse_latency(fault_latency_ms)
    start_step, data_index = 0, 0
    if resume_checkpoint is not None:
        from hetero_testnet.model.checkpoint import load_checkpoint_meta

        meta = load_checkpoint_meta(resume_checkpoint)
        if not all(isinstance(meta.get(k), int) for k in ("step", "data_index")):
            raise ConfigError(f"{resume_checkpoint} records no step and data position; it cannot be resumed")
        start_step, data_index = meta["step"], meta["data_index"]
    setup_logging(lambda: "[coordinator]", stream=sys.stderr, verbose=verbose)
    opts = CoordinatorOptions(
        run_dir=run_dir, token=token, host=bind, port=server_port, expected_clients=expect_clients, sync=sync,
        backend="nccl" if device == "cuda" else "gloo", min_clients=min_clients, checkpoint_every=checkpoint_every,
        resume_checkpoint=resume_checkpoint.resolve() if resume_checkpoint else None, start_step=start_step,
        start_data_index=data_index, listen_fd=listen_fd,
        fault={"latency_ms": latency, "latency_jitter_ms": jitter, "bandwidth_bytes_per_s": fault_bandwidth_limit})
    run_dir.mkdir(parents=True, exist_ok=True)
    raise typer.Exit(run_coordinator(cfg, opts))


def client(
    coordinator_address: Annotated[str, typer.Option("--coordinator", help="HOST:PORT of the coordinator.")],
    tier: Annotated[int, typer.Option("--tier", help="MatFormer tier (FFN width = intermediate >> tier).")] = 0,
    client_id: Annotated[Optional[int], typer.Option("--client-id", help="Stable identity (default: assigned "
                                                     "by the coordinator).")] = None,
    helper_fraction: Annotated[float, typer.Option("--helper-fraction", help="Helper neurons as a fraction of "
                                                   "the prefix width, in [0, 1].")] = 0.0,
    helper_rotation_interval: Annotated[int, typer.Option("--helper-rotation-interval",
                                                          help="Steps between helper re-draws.")] = 16,
    threads: Annotated[int, typer.Option("--threads", help="Torch threads for this client.")] = 1,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | mps.")] = "cpu",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Local data directory if it differs "
                                                     "from the coordinator's config.")] = None,
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="File holding the run token "
                                                       "(else HETERO_TESTNET_TOKEN).")] = None,
    coordinator_timeout: Annotated[float, typer.Option("--coordinator-timeout", help="Exit when the coordinator "
                                                       "is silent this long (s).")] = 15.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run one client: join a coordinator and train at a MatFormer tier."""
    from hetero_testnet.run.client import ClientOptions, run_client
    from hetero_testnet.events import setup_logging

    host, port = parse_address(coordinator_address)
    if tier < 0:
        raise ConfigError(f"--tier must be >= 0 (got {tier})")
    if not 0.0 <= helper_fraction <= 1.0:
        raise ConfigError(f"--helper-fraction must be in [0, 1] (got {helper_fraction:g})")
    if threads < 1:
        raise ConfigError("--threads must be >= 1")
    token = read_token(token_file)
    dev = resolve_device(device)
    opts = ClientOptions(coordinator_host=host, coordinator_port=port, token=token, tier=tier, client_id=client_id,
                         helper_fraction=helper_fraction, helper_rotation_interval=helper_rotation_interval,
                         threads=threads, device=dev, data_dir=data_dir, coordinator_timeout_s=coordinator_timeout)
    setup_logging(lambda: f"[client {opts.client_id or '?'} tier {tier}]", stream=sys.stderr, verbose=verbose)
    code = run_client(opts)
    # Leave without running C++ static destructors: a torch.distributed store or group torn down at
    # interpreter exit has aborted a finished client ("terminate called without an active exception").
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
