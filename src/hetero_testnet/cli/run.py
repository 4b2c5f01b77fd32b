"""`testnet start`, `testnet coordinator`, `testnet client`: the testnet's commands.

`start` spawns exactly the two other commands; they exist so that clients can join a run from
other machines (`testnet client --coordinator HOST:PORT --tier T` with the run's token in
HETERO_TESTNET_TOKEN or a `--token-file`). The token never appears on a command line.

Each command parses its flags (`cli/options.py`), plans (`run/plan.py`: every rule about what the
values mean) and runs; nothing here decides anything about the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from hetero_testnet.cli.options import (Demo1BitOption, DemoApplyOption, DemoChunkOption, DemoDecayOption,
                                        DemoTopkOption, DemoValuesOption, DilocoBf16Option, InnerStepsOption,
                                        OuterLrOption, OuterMomentumOption, SyncOption, TokenFileOption,
                                        VerboseOption, parse_address, parse_float_list, parse_int_list,
                                        parse_latency, read_token, resolve_device, warn_config)
from hetero_testnet.cli.device_options import (DEFAULT_REPLAN_EVERY, DEFAULT_SHARES, ClientBandwidthOption,
                                               ClientDownlinkOption, ClientLatencyOption, ClientLossOption,
                                               ClientProfilesOption, ClientSpeedsOption, ClientUplinkOption,
                                               ReplanEveryOption, SharesOption, profile_flags)
from hetero_testnet.cli.net_options import (DEFAULT_AUTO_CHECKPOINT_EVERY, AdvertiseHostOption, AutoCheckpointOption,
                                            GlooIfnameOption, PacketLossOption)
from hetero_testnet.cli.engine_options import (AddressOption, ClientResourcesOption, DataDirOption, EngineOption,
                                               ShipDataOption)
from hetero_testnet.cli.metrics import (WandbEntityOption, WandbGroupOption, WandbProjectOption, finish_stream,
                                        start_wandb_stream)
from hetero_testnet.config import DEFAULT_CONFIG
from hetero_testnet.errors import ConfigError


def register(app: typer.Typer) -> None:
    app.command("start")(start)
    app.command("coordinator")(coordinator)
    app.command("client")(client)


# long-function: Typer declares each of start's flags in its signature; the body is parse -> plan -> run
def start(
    num_clients: Annotated[int, typer.Option("--num-clients", "-n", help="Client processes to spawn.")] = 3,
    config_path: Annotated[Path, typer.Option("--config-path", "-c",
                                              help="Config directory (config.yaml or Psyche state.toml) or file.")
                           ] = DEFAULT_CONFIG,
    tiers: Annotated[Optional[str], typer.Option("--tiers", "--client-matformer-tiers",
                                                 help="MatFormer tier per client, e.g. 0,1,1 (cycles; default 0), "
                                                 "or auto: from each client's device profile.")
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
    seed: Annotated[Optional[int], typer.Option("--seed", help="Run seed (initial weights, helper draws, and "
                                                "the data order unless --data-seed); default from the config.")
                    ] = None,
    data_seed: Annotated[Optional[int], typer.Option("--data-seed", help="Seed of the training-sample order "
                                                     "(a permutation per epoch); default: the run seed.")] = None,
    total_steps: Annotated[Optional[int], typer.Option("--total-steps", help="Override config total_steps "
                                                       "(the LR schedule follows).")] = None,
    exit_after_secs: Annotated[Optional[float], typer.Option(
        "--exit-after-secs", "--headless-exit-after-secs",
        help="Safety cap: end the run cleanly as 'interrupted' after this many seconds.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps, or a list that "
                                        "cycles over the clients (cuda: spread over the GPUs; nccl only with one "
                                        "client per GPU, else gloo).")] = "auto",
    server_port: Annotated[int, typer.Option("--server-port", help="Coordinator port (0 = any free port).")
                           ] = 20000,
    bind: Annotated[str, typer.Option("--bind", help="Coordinator address; 0.0.0.0 lets other machines join "
                                      "(they still need the run token).")] = "127.0.0.1",
    sync: SyncOption = None,
    demo_topk: DemoTopkOption = None,
    demo_chunk: DemoChunkOption = None,
    demo_decay: DemoDecayOption = None,
    demo_1bit: Demo1BitOption = None,
    demo_values: DemoValuesOption = None,
    demo_apply: DemoApplyOption = None,
    inner_steps: InnerStepsOption = None,
    outer_lr: OuterLrOption = None,
    outer_momentum: OuterMomentumOption = None,
    diloco_bf16: DilocoBf16Option = None,
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
    fault_packet_loss: PacketLossOption = 0.0,
    auto_checkpoint_every: AutoCheckpointOption = DEFAULT_AUTO_CHECKPOINT_EVERY,
    advertise_host: AdvertiseHostOption = None,
    gloo_ifname: GlooIfnameOption = None,
    wandb_project: WandbProjectOption = None,
    wandb_group: WandbGroupOption = None,
    wandb_entity: WandbEntityOption = None,
    client_profiles: ClientProfilesOption = None,
    client_speeds: ClientSpeedsOption = None,
    client_bandwidth: ClientBandwidthOption = None,
    client_uplink: ClientUplinkOption = None,
    client_downlink: ClientDownlinkOption = None,
    client_latency_ms: ClientLatencyOption = None,
    client_packet_loss: ClientLossOption = None,
    shares: SharesOption = DEFAULT_SHARES,
    replan_every: ReplanEveryOption = DEFAULT_REPLAN_EVERY,
    engine: EngineOption = "local",
    address: AddressOption = None,
    client_resources: ClientResourcesOption = None,
    data_dir: DataDirOption = None,
    ship_data: ShipDataOption = False,
) -> None:
    """Start a coordinator and N clients and train one shared model at mixed MatFormer tiers."""
    from hetero_testnet.run.cluster import plan_engine
    from hetero_testnet.run.plan import FaultPlan, check_recovery_and_network, plan_launch
    from hetero_testnet.run.sync_flags import SyncFlags

    auto_tier = (tiers or "").strip() == "auto"
    tier_list = [] if auto_tier else parse_int_list(tiers, "--tiers")
    fractions = parse_float_list(helper_fractions, "--helper-fractions")
    intervals = parse_int_list(helper_rotation_intervals, "--helper-rotation-intervals")
    latency, jitter = parse_latency(fault_latency_ms)
    faults = FaultPlan(random_kill_num=random_kill_num, random_kill_interval_s=random_kill_interval,
                       allowed_to_kill=parse_int_list(allowed_to_kill, "--allowed-to-kill"),
                       kill_restart_delay_s=kill_restart_delay, latency_ms=latency, latency_jitter_ms=jitter,
                       bandwidth_bytes_per_s=fault_bandwidth_limit, packet_loss=fault_packet_loss)
    check_recovery_and_network(auto_checkpoint_every=auto_checkpoint_every, bind=bind, advertise_host=advertise_host,
                               gloo_ifname=gloo_ifname)
    plan = plan_launch(
        num_clients=num_clients, config_path=config_path, tiers=tier_list, helper_fractions=fractions,
        rotation_intervals=intervals, name=name, logs_dir=logs_dir, resume=resume, seed=seed, data_seed=data_seed,
        total_steps=total_steps,
        sync_flags=SyncFlags(sync=sync, demo_topk=demo_topk, demo_chunk=demo_chunk, demo_decay=demo_decay,
                             demo_1bit=demo_1bit, demo_values=demo_values, demo_apply=demo_apply,
                             inner_steps=inner_steps, outer_lr=outer_lr, outer_momentum=outer_momentum,
                             diloco_bf16=diloco_bf16),
        bind=bind, server_port=server_port, device=device, threads=threads,
        min_clients=min_clients, checkpoint_every=checkpoint_every, exit_after_s=exit_after_secs, faults=faults,
        command_line=shlex.join(["testnet", *sys.argv[1:]]), auto_tier=auto_tier, shares=shares,
        replan_every=replan_every, profiles=profile_flags(client_profiles, client_speeds, client_bandwidth,
                                                          client_uplink, client_downlink, client_latency_ms,
                                                          client_packet_loss))
    engine_plan = plan_engine(engine=engine, address=address, client_resources=client_resources, data_dir=data_dir,
                              ship_data=ship_data, tiers=[s.tier for s in plan.clients], data=plan.config.data)
    plan = dataclasses.replace(plan, auto_checkpoint_every=auto_checkpoint_every, advertise_host=advertise_host,
                               gloo_ifname=gloo_ifname, engine=engine_plan,
                               # clients under Ray run elsewhere (another cwd): checkpoint paths must be absolute
                               run_dir=plan.run_dir.resolve() if engine_plan.is_ray else plan.run_dir)
    warn_config(plan.config)
    stream = None
    if wandb_project:
        stream = start_wandb_stream(plan.run_dir, project=wandb_project, group=wandb_group, entity=wandb_entity,
                                    config={"num_clients": num_clients, "tiers": [s.tier for s in plan.clients],
                                            **plan.config.to_dict()})
    try:
        code = _run(plan, dashboard=(tui if tui is not None else sys.stdout.isatty()) and not headless)
    finally:
        if stream is not None:
            finish_stream(stream)
    raise typer.Exit(code)


def _run(plan, *, dashboard: bool) -> int:
    """The launcher under the dashboard, or with headless progress lines; its exit code."""
    from hetero_testnet.run.launcher import Launcher

    if dashboard:
        from hetero_testnet.tui.live import run_with_dashboard

        return run_with_dashboard(Launcher, plan)
    from hetero_testnet.tui.headless import HeadlessProgress

    print(f"run {plan.run_dir.name}: {len(plan.clients)} clients, tiers {','.join(str(s.tier) for s in plan.clients)}, "
          f"{plan.config.timing.total_steps} steps, logs in {plan.run_dir}/", flush=True)
    launcher = Launcher(plan, on_event=HeadlessProgress())
    # SIGTERM stops the run cleanly, as Ctrl-C does (and as the dashboard does): the one way to stop a
    # run started where SIGINT is ignored (a background job of a script, nohup, some CI runners).
    previous = signal.signal(signal.SIGTERM, lambda _s, _f: launcher.request_stop("SIGTERM received"))
    try:
        return launcher.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def coordinator(
    config_path: Annotated[Path, typer.Option("--config-path", "-c", help="Config directory or file.")
                           ] = DEFAULT_CONFIG,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Where events.jsonl, summary.json and the final "
                                          "checkpoint go.")] = Path("logs/coordinator"),
    bind: Annotated[str, typer.Option("--bind", help="Address to listen on.")] = "127.0.0.1",
    server_port: Annotated[int, typer.Option("--server-port", help="Port (0 = any free port).")] = 20000,
    expect_clients: Annotated[int, typer.Option("--expect-clients", help="Start once this many joined (0 = "
                                                "init_min_clients + extra time); the wait counts from the first.")
                              ] = 0,
    sync: Annotated[Optional[str], typer.Option("--sync", help="allreduce | none | demo | diloco (default: the "
                                                "config's; the mode's settings come from its sync: section).")
                    ] = None,
    device: Annotated[str, typer.Option("--device", help="Clients' device: decides gloo (cpu) or nccl (cuda) "
                                        "unless --backend is given.")] = "cpu",
    backend: Annotated[Optional[str], typer.Option("--backend", help="gloo | nccl (default: from --device; "
                                                   "start passes what the clients' devices imply).")] = None,
    min_clients: Annotated[Optional[int], typer.Option("--min-clients", help="Override min_clients.")] = None,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Checkpoint every K steps.")] = 0,
    resume_checkpoint: Annotated[Optional[Path], typer.Option("--resume-checkpoint",
                                                              help="Start from this checkpoint.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Override the config's seed.")] = None,
    data_seed: Annotated[Optional[int], typer.Option("--data-seed", help="Override the config's data_seed "
                                                     "(training-sample order; default: the seed).")] = None,
    total_steps: Annotated[Optional[int], typer.Option("--total-steps", help="Override total_steps.")] = None,
    token_file: TokenFileOption = None,
    fault_latency_ms: Annotated[Optional[str], typer.Option("--fault-latency-ms", help="BASE[-JITTER] ms added "
                                                            "to every client's exchange.")] = None,
    fault_bandwidth_limit: Annotated[float, typer.Option("--fault-bandwidth-limit",
                                                         help="Bytes/s cap for every client's exchange.")] = 0.0,
    fault_packet_loss: PacketLossOption = 0.0,
    auto_checkpoint_every: AutoCheckpointOption = DEFAULT_AUTO_CHECKPOINT_EVERY,
    advertise_host: AdvertiseHostOption = None,
    listen_fd: Annotated[Optional[int], typer.Option("--listen-fd", hidden=True,
                                                     help="Inherited listening socket (used by start).")] = None,
    shares: SharesOption = DEFAULT_SHARES,
    replan_every: ReplanEveryOption = DEFAULT_REPLAN_EVERY,
    verbose: VerboseOption = False,
) -> None:
    """Run the coordinator (control plane) of one run."""
    from hetero_testnet.events import setup_logging
    from hetero_testnet.run.serving import run_coordinator
    from hetero_testnet.run.plan import FaultPlan, check_recovery_and_network, plan_coordinator

    token = read_token(token_file)
    latency, jitter = parse_latency(fault_latency_ms)
    network = FaultPlan(latency_ms=latency, latency_jitter_ms=jitter, bandwidth_bytes_per_s=fault_bandwidth_limit,
                        packet_loss=fault_packet_loss)
    cfg, opts = plan_coordinator(
        config_path=config_path, run_dir=run_dir, token=token, bind=bind, server_port=server_port,
        expect_clients=expect_clients, sync=sync, device=device, backend=_backend(backend), min_clients=min_clients,
        checkpoint_every=checkpoint_every, resume_checkpoint=resume_checkpoint, seed=seed, data_seed=data_seed,
        total_steps=total_steps, network=network, listen_fd=listen_fd, shares=shares, replan_every=replan_every)
    check_recovery_and_network(auto_checkpoint_every=auto_checkpoint_every, bind=bind, advertise_host=advertise_host)
    if not 0.0 <= fault_packet_loss < 1.0:
        raise ConfigError(f"--fault-packet-loss must be a probability in [0, 1) (got {fault_packet_loss:g})")
    opts = dataclasses.replace(opts, auto_checkpoint_every=auto_checkpoint_every, advertise_host=advertise_host)
    warn_config(cfg)
    setup_logging(lambda: "[coordinator]", stream=sys.stderr, verbose=verbose)
    raise typer.Exit(run_coordinator(cfg, opts))


def _backend(backend: str | None) -> str | None:
    from hetero_testnet.cli.options import check_choice

    return None if backend is None else check_choice(backend, ("gloo", "nccl"), "--backend")


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
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")] = "cpu",
    data_dir: Annotated[Optional[Path], typer.Option("--data-dir", help="Local data directory if it differs "
                                                     "from the coordinator's config.")] = None,
    token_file: TokenFileOption = None,
    coordinator_timeout: Annotated[float, typer.Option("--coordinator-timeout", help="Exit when the coordinator "
                                                       "is silent this long (s).")] = 15.0,
    gloo_ifname: GlooIfnameOption = None,
    profile_name: Annotated[str, typer.Option("--profile-name", help="Name of the device it emulates (for "
                                              "reports).")] = "local",
    speed: Annotated[float, typer.Option("--speed", help="Emulated compute speed in (0, 1]: every round's "
                                         "compute takes natural time / speed.")] = 1.0,
    uplink: Annotated[float, typer.Option("--uplink", help="Emulated uplink, bytes/s (0 = unlimited).")] = 0.0,
    downlink: Annotated[float, typer.Option("--downlink", help="Emulated downlink, bytes/s (0 = unlimited).")
                        ] = 0.0,
    latency_ms: Annotated[float, typer.Option("--latency-ms", help="Emulated link latency per exchange.")] = 0.0,
    packet_loss: Annotated[float, typer.Option("--packet-loss", help="Emulated packet loss in [0, 1).")] = 0.0,
    verbose: VerboseOption = False,
) -> None:
    """Run one client: join a coordinator and train at a MatFormer tier (optionally as a slower
    device: --speed and the link flags emulate it, see README "Devices")."""
    from hetero_testnet.events import setup_logging
    from hetero_testnet.config.devices import DeviceProfile
    from hetero_testnet.run.client import run_client
    from hetero_testnet.run.client_options import ClientOptions
    from hetero_testnet.run.plan import check_helper_fraction, check_recovery_and_network

    host, port = parse_address(coordinator_address)
    if tier < 0:  # the width check (matformer.ffn_width) needs the run's config: the coordinator does it
        raise ConfigError(f"--tier must be >= 0 (got {tier})")
    check_helper_fraction(helper_fraction, error=f"--helper-fraction must be in [0, 1] (got {helper_fraction:g})")
    if threads < 1:
        raise ConfigError("--threads must be >= 1")
    token = read_token(token_file)
    if gloo_ifname is not None:
        check_recovery_and_network(auto_checkpoint_every=0, bind="", advertise_host=None, gloo_ifname=gloo_ifname)
        os.environ["GLOO_SOCKET_IFNAME"] = gloo_ifname  # read by gloo when a group forms
    dev = resolve_device(device)
    profile = DeviceProfile(name=profile_name, speed=speed, uplink_bytes_per_s=uplink, downlink_bytes_per_s=downlink,
                            latency_ms=latency_ms, packet_loss=packet_loss)
    opts = ClientOptions(profile=profile, coordinator_host=host, coordinator_port=port, token=token, tier=tier, client_id=client_id,
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
