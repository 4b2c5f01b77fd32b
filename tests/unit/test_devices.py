"""Every device, honestly: the device and backend choice (pure, tested on CPU), host staging for gloo,
and no float64 tensors in MaskedAdamW's step (MPS has none), with CPU results bit-identical."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from hetero_testnet.errors import ConfigError
from hetero_testnet.exchange.formation import on_host, stages_through_host
from hetero_testnet.run.devices import assign_devices, choose_backend, client_devices, describe, parse_devices
from hetero_testnet.run.plan import ClientSpec

ROOT = Path(__file__).resolve().parents[2]


def test_device_lists_parse_and_cycle():
    assert parse_devices("cuda:1, cpu") == ["cuda:1", "cpu"] and parse_devices("") == ["auto"]
    for bad in ("gpu", "cpu:1", "cuda:x", "cuda,,cpu"):
        with pytest.raises(ConfigError, match="--device entries"):
            parse_devices(bad)
    assert client_devices(["cuda:0", "cpu"], 3, cuda_count=1) == ["cuda:0", "cpu", "cuda:0"]


@pytest.mark.parametrize("entries, gpus, want, backend", [
    (["cuda"], 1, ["cuda:0"] * 3, "gloo"),            # 3 clients, one GPU: NCCL would refuse
    (["cuda"], 3, ["cuda:0", "cuda:1", "cuda:2"], "nccl"),  # one process per GPU
    (["cuda"], 2, ["cuda:0", "cuda:1", "cuda:0"], "gloo"),
    (["auto"], 0, ["cpu"] * 3, "gloo"),
    (["auto"], 4, ["cuda:0", "cuda:1", "cuda:2"], "nccl"),
    (["cuda:1", "cuda:0", "cuda:2"], 3, ["cuda:1", "cuda:0", "cuda:2"], "nccl"),
    (["cuda:0", "cpu"], 1, ["cuda:0", "cpu", "cuda:0"], "gloo"),
])
def test_backend_follows_the_devices_present(entries, gpus, want, backend):
    devices = client_devices(entries, 3, cuda_count=gpus)
    assert devices == want and choose_backend(devices) == backend


def test_devices_that_are_not_there_are_one_line_errors():
    with pytest.raises(ConfigError, match="no CUDA device"):
        client_devices(["cuda"], 2, cuda_count=0)
    with pytest.raises(ConfigError, match=r"cuda:2 but this machine has 2 CUDA device\(s\) \(cuda:0..cuda:1\)"):
        client_devices(["cuda:2"], 1, cuda_count=2)
    with pytest.raises(ConfigError, match="MPS is not available"):
        client_devices(["mps"], 1, cuda_count=0, mps=False)
    assert choose_backend(client_devices(["mps"], 2, cuda_count=0, mps=True)) == "gloo"


def test_gloo_stages_accelerator_tensors_through_host():
    assert not stages_through_host("gloo", "cpu") and not stages_through_host("nccl", "cuda")
    assert stages_through_host("gloo", "cuda") and stages_through_host("gloo", "mps")
    t = torch.ones(3)
    assert on_host(t, "gloo") is t
    assert describe(["cuda:0"] * 3, "gloo") == "devices cuda:0 x3 (gloo, staged through host)"
    assert describe(["cuda:0", "cuda:1"], "nccl") == "devices cuda:0, cuda:1 (nccl)"


def test_the_plan_gives_each_client_its_device_and_the_coordinator_the_backend(logs_dir):
    from hetero_testnet.run.plan import plan_launch

    plan = plan_launch(num_clients=2, config_path=ROOT / "configs" / "tiny", tiers=[0, 1], logs_dir=logs_dir,
                       name="d", device="cpu", cores=2)
    assert [s.device for s in plan.clients] == ["cpu", "cpu"] and plan.backend == "gloo"
    args = plan.coordinator_args(3)
    assert args[args.index("--backend") + 1] == "gloo"
    client = plan.client_args(plan.clients[1], "127.0.0.1:1")
    assert client[client.index("--device") + 1] == "cpu"
    specs = [ClientSpec(client_id=i, tier=0, helper_fraction=0.0, rotation_interval=16) for i in (1, 2, 3)]
    assert assign_devices(specs, "cuda", present=(1, False)) == "gloo" and {s.device for s in specs} == {"cuda:0"}
    assert assign_devices(specs, "cuda", present=(8, False)) == "nccl"


def _old_factors(step: torch.Tensor, lr: float, b1: float, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64-tensor computation MaskedAdamW used before (kept here as the reference bits)."""
    def bias_correction(beta):
        out = torch.empty_like(step)
        for value in torch.unique(step).tolist():
            out[step == value] = 1.0 - beta ** value
        return out
    return (lr / bias_correction(b1).double()).float(), torch.sqrt(bias_correction(b2).double()).float()


def test_per_neuron_bias_correction_is_bit_identical_without_float64():
    from hetero_testnet.model.optim import _per_neuron_factors

    gen = torch.Generator().manual_seed(0)
    step = torch.cat([torch.arange(1, 200), torch.randint(200, 100000, (56,), generator=gen)]).float().view(-1, 1)
    for lr in (6e-4, 3e-3, 1.2345e-5, 0.0):
        for b1, b2 in ((0.9, 0.95), (0.9, 0.999), (0.8, 0.99)):
            new, old = _per_neuron_factors(step, lr, b1, b2), _old_factors(step, lr, b1, b2)
            assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1]), (lr, b1, b2)
    assert math.isclose(float(_per_neuron_factors(torch.ones(1), 1.0, 0.9, 0.95)[0]), 10.0, rel_tol=1e-6)


class _Float64Spy(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                self.seen.append(getattr(func, "__name__", str(func)))
        return out


def test_masked_adamw_step_makes_no_float64_tensor(tiny_config, tiny_model):
    from hetero_testnet.model.matformer import NeuronSet, build_neuron_masks
    from hetero_testnet.model.optim import MaskedAdamW

    opt = MaskedAdamW(tiny_model.named_parameters(), tiny_config.optimizer)
    width = tiny_config.model.intermediate_size // 2
    masks = build_neuron_masks(NeuronSet(prefix_width=width), tiny_config.model.intermediate_size,
                               tiny_config.model.num_hidden_layers)
    update = {}
    for name, p in tiny_model.named_parameters():
        p.grad = torch.full_like(p, 0.01)
        if ".mlp." in name:
            layer = int(name.split(".")[2])
            update[name] = masks[layer].view(-1, 1) if "down" not in name else masks[layer].view(1, -1)
    with _Float64Spy() as spy:
        opt.step(1e-3, update)
        opt.step(1e-3, {})
    assert spy.seen == []
