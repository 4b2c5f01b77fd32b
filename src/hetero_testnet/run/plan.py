"""Launch planning: the checked, complete description of a run, before anything is spawned.

`plan_launch` turns what `testnet start` was given (already parsed into numbers and lists by the
CLI) into a `LaunchPlan`: it resolves `--resume` into a run directory, checkpoint and config, cycles
the per-client lists into `ClientSpec`s, splits the cores into threads and checks the fault flags.
`plan_coordinator` does the same for `testnet coordinator` (it reads the resumed checkpoint's
position). Neither starts a process or needs Typer, so every rule here is unit-tested directly;
bad input raises `ConfigError` with a one-line message that names the flag to change.

`LaunchPlan.coordinator_args` / `client_args` are the exact command lines the launcher runs, as
data (accelerate's `prepare_*_cmd_env`): tests assert on them without spawning. The model and
checkpoint code is imported only where it is needed, so the CLI starts without torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hetero_testnet.config import DIRECTORY_NAME, RunConfig, load_run_config
from hetero_testnet.errors import ConfigError
from hetero_testnet.run.cluster import EnginePlan
from hetero_testnet.run.sync_flags import SyncFlags, apply_sync_flags, check_sync, check_sync_tiers
from hetero_testnet.config.devices import DeviceProfile
from hetero_testnet.run.devices import assign_devices
from hetero_testnet.run.profiles import ProfileFlags, auto_tiers, client_profiles, profile_args
from hetero_testnet.run.shares import DEFAULT_REPLAN_EVERY, DEFAULT_SHARES, check_shares
from hetero_testnet.rundir import RunDir

TOKEN_ENV = "HETERO_TESTNET_TOKEN"
"""The environment variable that carries the run token (the launcher sets it for its children)."""
DEFAULT_ROTATION_INTERVAL = 16
"""Steps between helper re-draws when `--helper-rotation-intervals` is not given (the reference's)."""
DEFAULT_AUTO_CHECKPOINT_EVERY = 5
"""Steps between automatic recovery checkpoints (`run/recovery.py`; 0 turns them off)."""
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"
"""The variable gloo reads for the network interface(s) its sockets use (`--gloo-ifname`)."""


@dataclass
class ClientSpec:
    client_id: int
    tier: int
    helper_fraction: float
    rotation_interval: int
    device: str = "cpu"
    """Where it trains (`run/devices.py`: `--device` cycled over the clients, `cuda` spread over GPUs)."""
    profile: DeviceProfile = field(default_factory=DeviceProfile)
    """The device it emulates (`run/profiles.py`): compute speed and link."""
    tier_reason: str | None = None
    """Why `--tiers auto` gave it this tier (None: the tier was given)."""


@dataclass
class FaultPlan:
    random_kill_num: int = 0
    random_kill_interval_s: float = 120.0
    allowed_to_kill: list[int] = field(default_factory=list)
    """Client ids eligible for kills; empty means all."""
    kill_restart_delay_s: float = 1.0
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    bandwidth_bytes_per_s: float = 0.0
    """0 means no cap."""
    packet_loss: float = 0.0
    """Probability in [0, 1) that a packet of an exchange is lost (emulated, `exchange/faults.py`)."""
    seed: int = 0
    """Seeds the choice of victims (the run's seed)."""

    def network(self) -> dict[str, float]:
        """The network faults as the coordinator hands them to every client (`Welcome.fault`)."""
        out = {"latency_ms": self.latency_ms, "latency_jitter_ms": self.latency_jitter_ms,
               "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s}
        if self.packet_loss:  # only when set, so runs without it hand clients what they always did
            out["packet_loss"] = self.packet_loss
        return out


@dataclass
class LaunchPlan:
    run_dir: Path
    config: RunConfig
    clients: list[ClientSpec]
    sync: str = "allreduce"
    bind: str = "127.0.0.1"
    server_port: int = 20000
    device: str = "cpu"
    threads_per_client: int = 1
    exit_after_s: float | None = None
    min_clients: int | None = None
    checkpoint_every: int = 0
    resume_checkpoint: Path | None = None
    faults: FaultPlan = field(default_factory=FaultPlan)
    command_line: str = ""
    backend: str = "gloo"
    """The collective backend the clients' devices imply (`run/devices.choose_backend`)."""
    auto_checkpoint_every: int = DEFAULT_AUTO_CHECKPOINT_EVERY
    advertise_host: str | None = None
    """The store address clients are told (`--advertise-host`; default: the bind address)."""
    gloo_ifname: str | None = None
    """Set as GLOO_SOCKET_IFNAME for the clients (`--gloo-ifname`)."""
    shares: str = DEFAULT_SHARES
    """How the coordinator splits the global batch (`run/shares.py`)."""
    replan_every: int = DEFAULT_REPLAN_EVERY
    engine: EnginePlan = field(default_factory=EnginePlan)
    """What runs the clients (`run/cluster.py`: local subprocesses, or Ray actors)."""

    def coordinator_args(self, listen_fd: int) -> list[str]:
        """`testnet coordinator ...` arguments; it inherits the listening socket as `listen_fd`."""
        args = ["coordinator", "--config-path", str(RunDir(self.run_dir).config), "--run-dir", str(self.run_dir),
                "--bind", self.bind, "--listen-fd", str(listen_fd), "--expect-clients", str(len(self.clients)),
                "--sync", self.sync, "--device", self.device, "--backend", self.backend,
                "--checkpoint-every", str(self.checkpoint_every)]
        if self.min_clients is not None:
            args += ["--min-clients", str(self.min_clients)]
        if self.resume_checkpoint is not None:
            args += ["--resume-checkpoint", str(self.resume_checkpoint)]
        f = self.faults
        if f.latency_ms or f.latency_jitter_ms:
            args += ["--fault-latency-ms", f"{f.latency_ms:g}-{f.latency_jitter_ms:g}"]
        if f.bandwidth_bytes_per_s:
            args += ["--fault-bandwidth-limit", f"{f.bandwidth_bytes_per_s:g}"]
        if f.packet_loss:
            args += ["--fault-packet-loss", f"{f.packet_loss:g}"]
        if self.auto_checkpoint_every != DEFAULT_AUTO_CHECKPOINT_EVERY:
            args += ["--auto-checkpoint-every", str(self.auto_checkpoint_every)]
        if self.advertise_host:
            args += ["--advertise-host", self.advertise_host]
        if self.shares != DEFAULT_SHARES:
            args += ["--shares", self.shares, "--replan-every", str(self.replan_every)]
        return args

    def client_args(self, spec: ClientSpec, address: str) -> list[str]:
        """`testnet client ...` arguments for one client joining the coordinator at `address`."""
        return ["client", "--coordinator", address, "--client-id", str(spec.client_id), "--tier", str(spec.tier),
                "--helper-fraction", str(spec.helper_fraction), "--helper-rotation-interval",
                str(spec.rotation_interval), "--threads", str(self.threads_per_client), "--device", spec.device,
                *profile_args(spec.profile)]


@dataclass
class CoordinatorOptions:
    run_dir: Path
    token: str
    host: str = "127.0.0.1"
    port: int = 20000
    expected_clients: int = 0
    """Start as soon as this many clients joined (0 = init_min_clients, plus the extra time)."""
    sync: str = "allreduce"
    backend: str = "gloo"
    min_clients: int | None = None
    checkpoint_every: int = 0
    resume_checkpoint: Path | None = None
    start_step: int = 0
    start_data_index: int = 0
    fault: dict[str, Any] = field(default_factory=dict)
    listen_fd: int | None = None
    """An already listening socket inherited from the launcher (so clients can start at once)."""
    auto_checkpoint_every: int = DEFAULT_AUTO_CHECKPOINT_EVERY
    advertise_host: str | None = None
    """The address clients are told to reach the store at (default: the bind address; required
    in practice when binding 0.0.0.0, else the hostname is used)."""
    shares: str = DEFAULT_SHARES
    """`equal` or `proportional` batch shares (`run/shares.py`)."""
    replan_every: int = DEFAULT_REPLAN_EVERY


# ----------------------------------------------------------------- rules shared by the commands

def cycle(values: Sequence[Any], i: int, default: Any) -> Any:
    """The reference's rule: empty -> default; otherwise client i gets values[i % len(values)]."""
    return values[i % len(values)] if values else default


def check_helper_fraction(value: float, *, error: str) -> float:
    """matformer's rule for a helper fraction (a number in [0, 1]), reported with the caller's message."""
    from hetero_testnet.model.matformer import _check_fraction  # the one rule; it has no public name yet

    try:
        return _check_fraction(value)
    except ConfigError:
        raise ConfigError(error) from None


def load_config(config_path: Path, *, seed: int | None = None, data_seed: int | None = None,
                total_steps: int | None = None) -> RunConfig:
    """The run config at `config_path`, with the command line's seeds and step count applied."""
    cfg = load_run_config(config_path)
    if seed is not None:
        cfg = cfg.replace(seed=seed)
    if data_seed is not None:
        cfg = cfg.replace(data_seed=data_seed)
    if total_steps is not None:
        cfg = cfg.with_total_steps(total_steps)
    return cfg


def default_run_name(tiers: Sequence[int], now: datetime | None = None) -> str:
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    return f"tiers-{'-'.join(map(str, tiers))}-{stamp}"


def resume_position(checkpoint: Path) -> tuple[int, int]:
    """(step, data index) a checkpoint records: where a resumed run continues."""
    from hetero_testnet.model.checkpoint import load_checkpoint_meta

    meta = load_checkpoint_meta(checkpoint)
    if not all(isinstance(meta.get(k), int) for k in ("step", "data_index")):
        raise ConfigError(f"{checkpoint} records no step and data position; it cannot be resumed")
    return meta["step"], meta["data_index"]


def _check_data(cfg: RunConfig) -> None:
    """Open both splits once before spawning anything, so bad data is a one-line error up front."""
    from hetero_testnet.data.shards import open_split

    for split in ("train", "val"):
        open_split(cfg.data, split, cfg.model.max_seq_len, cfg.model.vocab_size)


# ----------------------------------------------------------------- testnet start

def plan_launch(*, num_clients: int, config_path: Path, tiers: Sequence[int] = (),
                helper_fractions: Sequence[float] = (), rotation_intervals: Sequence[int] = (),
                name: str | None = None, logs_dir: Path = Path("logs"), resume: Path | None = None,
                seed: int | None = None, data_seed: int | None = None, total_steps: int | None = None,
                sync: str | None = None, sync_flags: SyncFlags = SyncFlags(), bind: str = "127.0.0.1", server_port: int = 20000,
                device: str = "cpu", threads: int | None = None, min_clients: int | None = None,
                checkpoint_every: int = 0, exit_after_s: float | None = None, faults: FaultPlan | None = None,
                command_line: str = "", cores: int | None = None, now: datetime | None = None,
                profiles: ProfileFlags = ProfileFlags(), auto_tier: bool = False, shares: str = DEFAULT_SHARES,
                replan_every: int = DEFAULT_REPLAN_EVERY) -> LaunchPlan:
    """Check `testnet start`'s input and plan the run; raises ConfigError (exit 2) on bad input.

    `tiers`, `helper_fractions` and `rotation_intervals` cycle over the clients (empty: 0, 0.0, 16).
    With `resume` (a run directory) the run continues there from its latest checkpoint with its own
    config (`seed`, `data_seed` and `config_path` are then ignored). `threads` defaults to `cores // num_clients`
    (`cores`: this machine's). `faults.seed` is replaced by the run's seed. `now` names a run
    without `name`. `device` must already be resolved (cpu, cuda, mps). `sync` (or `sync_flags.sync`;
    None: the config's mode) and the mode flags go into the config (`run/sync_flags.py`). Reads the
    config, the checkpoint's metadata and the data shards' headers; writes nothing. `profiles` and
    `auto_tier` (`--tiers auto`, then `tiers` is ignored): `run/profiles.py`; `shares`: `run/shares.py`.
    """
    if num_clients < 1:
        raise ConfigError(f"--num-clients must be >= 1 (got {num_clients})")
    if sync is not None:
        sync_flags = dataclasses.replace(sync_flags, sync=check_sync(sync))
    if server_port < 0 or server_port > 65535:
        raise ConfigError(f"--server-port must be in 0..65535 (got {server_port})")
    for f in helper_fractions:
        check_helper_fraction(f, error=f"--helper-fractions values must be in [0, 1] (got {f:g})")
    for i in rotation_intervals:
        if i < 1:
            raise ConfigError(f"--helper-rotation-intervals values must be >= 1 (got {i})")
    cfg, resume_checkpoint = _resolve_config(resume, config_path, seed=seed, data_seed=data_seed,
                                             total_steps=total_steps)
    cfg = apply_sync_flags(cfg, sync_flags, resumed=resume is not None)
    specs = _client_specs(cfg, num_clients, tiers, helper_fractions, rotation_intervals, profiles, auto_tier)
    check_shares(shares, replan_every)
    backend = assign_devices(specs, device)
    check_sync_tiers(cfg, [s.tier for s in specs])
    _check_min_clients(cfg, num_clients, min_clients)
    run_dir = resume if resume is not None else _new_run_dir(logs_dir, name, specs, now)
    _check_data(cfg)
    faults = _checked_faults(faults or FaultPlan(), num_clients, seed=cfg.seed)
    if exit_after_s is not None and exit_after_s <= 0:
        raise ConfigError("--exit-after-secs must be > 0")
    per_client = threads if threads is not None else max(1, (cores or os.cpu_count() or 1) // num_clients)
    if per_client < 1:
        raise ConfigError("--threads must be >= 1")
    return LaunchPlan(run_dir=run_dir, config=cfg, clients=specs, sync=cfg.sync.mode, bind=bind, server_port=server_port,
                      device=device, backend=backend, threads_per_client=per_client, exit_after_s=exit_after_s,
                      min_clients=min_clients, checkpoint_every=checkpoint_every, resume_checkpoint=resume_checkpoint,
                      faults=faults, command_line=command_line, shares=shares, replan_every=replan_every)


def _resolve_config(resume: Path | None, config_path: Path, *, seed: int | None, data_seed: int | None,
                    total_steps: int | None) -> tuple[RunConfig, Path | None]:
    """(config, None) of a new run; (its recorded config, its latest checkpoint) of a resumed one."""
    if resume is None:
        cfg = load_config(config_path, seed=seed, data_seed=data_seed, total_steps=total_steps)
        return (cfg, None) if cfg.init_checkpoint is None else _from_init_checkpoint(cfg)
    from hetero_testnet.model.checkpoint import latest_checkpoint

    if not RunDir(resume).config.is_file():
        raise ConfigError(f"--resume {resume} is not a run directory (no config.yaml)")
    checkpoint = latest_checkpoint(resume)
    return load_config(RunDir(resume).config, total_steps=total_steps), checkpoint


def _from_init_checkpoint(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """A new run from the config's initial checkpoint (Psyche's `checkpoint` repo_id): Psyche takes the
    model's shape from the checkpoint, so does this (the config's max_seq_len is kept)."""
    from hetero_testnet.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(cfg.init_checkpoint)
    model = dataclasses.replace(ckpt.model_config, max_seq_len=cfg.model.max_seq_len)
    return cfg.replace(model=model), cfg.init_checkpoint


def _client_specs(cfg: RunConfig, num_clients: int, tiers: Sequence[int], fractions: Sequence[float],
                  intervals: Sequence[int], profile_flags: ProfileFlags, auto_tier: bool) -> list[ClientSpec]:
    from hetero_testnet.model.matformer import ffn_width

    profiles = client_profiles(cfg.devices, num_clients, profile_flags)
    chosen = auto_tiers(cfg.model, profiles) if auto_tier else None
    specs = []
    for i in range(num_clients):
        tier = chosen[i].tier if chosen else cycle(tiers, i, 0)
        ffn_width(cfg.model.intermediate_size, tier)  # the tier must leave FFN neurons at this width
        specs.append(ClientSpec(client_id=i + 1, tier=tier, helper_fraction=cycle(fractions, i, 0.0),
                                rotation_interval=cycle(intervals, i, DEFAULT_ROTATION_INTERVAL),
                                profile=profiles[i], tier_reason=chosen[i].reason if chosen else None))
    return specs


def _check_min_clients(cfg: RunConfig, num_clients: int, min_clients: int | None) -> None:
    need = min_clients if min_clients is not None else cfg.timing.init_min_clients
    if min_clients is not None and min_clients < 1:
        raise ConfigError(f"--min-clients must be >= 1 (got {min_clients})")
    if num_clients < need:
        raise ConfigError(f"--num-clients {num_clients} is below the config's init_min_clients {need}",
                          hint="add clients, or pass --min-clients to override")


def _new_run_dir(logs_dir: Path, name: str | None, specs: list[ClientSpec], now: datetime | None) -> Path:
    if name is not None and not DIRECTORY_NAME.match(name):
        raise ConfigError(f"--name {name!r} must be one directory name: letters, digits, '.', '_', '+', '-'",
                          hint="logs go to <logs-dir>/<name>/; use --logs-dir to write elsewhere")
    run_dir = logs_dir / (name or default_run_name([s.tier for s in specs], now))
    if RunDir(run_dir).summary.exists():
        raise ConfigError(f"run directory {run_dir} already holds a finished run",
                          hint="choose another --name, or --resume it")
    return run_dir


def _checked_faults(faults: FaultPlan, num_clients: int, *, seed: int) -> FaultPlan:
    if faults.latency_ms < 0 or faults.latency_jitter_ms < 0:
        raise ConfigError("--fault-latency-ms must be BASE or BASE-JITTER, both >= 0 "
                          f"(got {faults.latency_ms:g}-{faults.latency_jitter_ms:g})")
    if faults.bandwidth_bytes_per_s < 0:
        raise ConfigError("--fault-bandwidth-limit must be >= 0")
    for k in faults.allowed_to_kill:
        if not 1 <= k <= num_clients:
            raise ConfigError(f"--allowed-to-kill names client {k}, but clients are 1..{num_clients}")
    if faults.random_kill_num < 0 or faults.random_kill_interval_s <= 0 or faults.kill_restart_delay_s < 0:
        raise ConfigError("--random-kill-num must be >= 0, --random-kill-interval > 0, --kill-restart-delay >= 0")
    if not 0.0 <= faults.packet_loss < 1.0:
        raise ConfigError(f"--fault-packet-loss must be a probability in [0, 1) (got {faults.packet_loss:g})")
    return dataclasses.replace(faults, allowed_to_kill=list(faults.allowed_to_kill), seed=seed)


def check_recovery_and_network(*, auto_checkpoint_every: int, bind: str, advertise_host: str | None,
                               gloo_ifname: str | None = None) -> None:
    """The rules of `--auto-checkpoint-every`, `--advertise-host` and `--gloo-ifname` (both commands)."""
    if auto_checkpoint_every < 0:
        raise ConfigError(f"--auto-checkpoint-every must be >= 0 (got {auto_checkpoint_every}; 0 turns it off)")
    if advertise_host is not None and (not advertise_host.strip() or advertise_host in ("0.0.0.0", "::")):
        raise ConfigError(f"--advertise-host must be an address other machines can reach (got {advertise_host!r})")
    if advertise_host is not None and bind not in ("0.0.0.0", "::", advertise_host):
        raise ConfigError(f"--advertise-host {advertise_host} differs from --bind {bind}: clients could not reach "
                          "the store", hint="bind 0.0.0.0 to listen on every interface, or drop --advertise-host")
    if gloo_ifname is not None and not all(part.strip() for part in gloo_ifname.split(",")):
        raise ConfigError(f"--gloo-ifname must name network interfaces, comma-separated (got {gloo_ifname!r})")


# ----------------------------------------------------------------- testnet coordinator

def plan_coordinator(*, config_path: Path, run_dir: Path, token: str, bind: str = "127.0.0.1",
                     server_port: int = 20000, expect_clients: int = 0, sync: str | None = None,
                     device: str = "cpu", backend: str | None = None, min_clients: int | None = None,
                     checkpoint_every: int = 0, resume_checkpoint: Path | None = None, seed: int | None = None,
                     data_seed: int | None = None, total_steps: int | None = None, network: FaultPlan | None = None,
                     listen_fd: int | None = None, sync_flags: SyncFlags = SyncFlags(),
                     shares: str = DEFAULT_SHARES, replan_every: int = DEFAULT_REPLAN_EVERY
                     ) -> tuple[RunConfig, CoordinatorOptions]:
    """The config and options of one coordinator; raises ConfigError on bad input.

    `device` is the clients' (cuda selects nccl, anything else gloo) unless `backend` is given; of
    `network` only the network faults are used. With `resume_checkpoint` the run continues at the step and data index it records.
    `sync` / `sync_flags` as in `plan_launch` (the launcher passes the mode its config.yaml already holds).
    """
    if sync is not None:
        sync_flags = dataclasses.replace(sync_flags, sync=check_sync(sync))
    cfg = apply_sync_flags(load_config(config_path, seed=seed, data_seed=data_seed, total_steps=total_steps),
                           sync_flags)
    sync = cfg.sync.mode
    start_step, data_index = resume_position(resume_checkpoint) if resume_checkpoint is not None else (0, 0)
    return cfg, CoordinatorOptions(
        run_dir=run_dir, token=token, host=bind, port=server_port, expected_clients=expect_clients, sync=sync,
        backend=backend or ("nccl" if device.startswith("cuda") else "gloo"), min_clients=min_clients,
        checkpoint_every=checkpoint_every,
        resume_checkpoint=resume_checkpoint.resolve() if resume_checkpoint else None, start_step=start_step,
        start_data_index=data_index, listen_fd=listen_fd, fault=(network or FaultPlan()).network(),
        shares=check_shares(shares, replan_every), replan_every=replan_every)
