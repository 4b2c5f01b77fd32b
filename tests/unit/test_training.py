"""forward_backward, evaluate and train_single on synthetic samples (no data files needed)."""

from __future__ import annotations

import torch

from hetero_testnet.model.checkpoint import load_checkpoint
from hetero_testnet.model.matformer import NeuronSet, is_ffn_param
from hetero_testnet.model.nanogpt import build_model
from hetero_testnet.model.optim import step_lr
from hetero_testnet.model.train import evaluate, forward_backward
from hetero_testnet.run.single import train_single


class SyntheticSamples:
    """`data.SampleDataset`'s interface over random tokens: sample j is fixed by (seed, j % n)."""

    def __init__(self, num_samples: int, seq_len: int, vocab: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.tokens = torch.randint(0, vocab, (num_samples, seq_len + 1), generator=torch.Generator().manual_seed(seed))

    def batch(self, start: int, count: int) -> torch.Tensor:
        ids = torch.arange(start, start + count) % self.num_samples
        return self.tokens[ids].clone()


def test_micro_batches_match_whole_batch(tiny_model, tiny_config):
    data = SyntheticSamples(5, tiny_config.model.max_seq_len, tiny_config.model.vocab_size)
    tokens = data.batch(0, 5)
    neurons = NeuronSet(prefix_width=32)
    loss, n = forward_backward(tiny_model, tokens, neurons, 0)
    whole = {k: p.grad.clone() for k, p in tiny_model.named_parameters()}
    loss2, n2 = forward_backward(tiny_model, tokens, neurons, 2)  # 2 + 2 + 1 sequences; grads re-zeroed
    assert n == n2 == 5 * tiny_config.model.max_seq_len
    assert abs(loss - loss2) < 1e-5
    for name, p in tiny_model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-7, msg=name)
        assert p.grad.shape == p.shape


def test_evaluate_is_fixed_and_restores_mode(tiny_model, tiny_config):
    data = SyntheticSamples(10, tiny_config.model.max_seq_len, tiny_config.model.vocab_size)
    tiny_model.train()
    a = evaluate(tiny_model, data, None, 6, 4)
    assert tiny_model.training
    tiny_model.eval()
    b = evaluate(tiny_model, data, None, 6, 6)
    assert not tiny_model.training
    assert abs(a - b) < 1e-5
    expected = float(tiny_model.loss(data.batch(0, 6)).detach())
    assert abs(a - expected) < 1e-5
    assert all(p.grad is None for p in tiny_model.parameters())


def test_train_single_tier1_trains_prefix_only(tiny_config, logs_dir):
    m = tiny_config.model
    train = SyntheticSamples(8, m.max_seq_len, m.vocab_size, seed=1)
    val = SyntheticSamples(8, m.max_seq_len, m.vocab_size, seed=2)
    records, evals = [], []
    result = train_single(tiny_config, 1, 0.0, 16, 6, logs_dir, records.append, seed=3, on_eval=evals.append,
                          train_data=train, val_data=val)
    assert [r["step"] for r in records] == list(range(6))
    assert set(records[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "step_time_s", "tokens_per_sec"}
    # step 0 trains at the reference's step-1 rate (warmup from 0 over warmup_steps), never at 0
    assert records[0]["lr"] == step_lr(0, tiny_config.lr_schedule) > 0.0 and records[0]["tokens"] == 6 * m.max_seq_len
    assert records[-1]["loss"] < records[0]["loss"]  # 8 samples seen repeatedly: it memorises
    assert [e["step"] for e in evals] == [0, 4, 6]  # start, eval_every=4, end
    assert result.final_val_loss == evals[-1]["val_loss"] and result.initial_val_loss == evals[0]["val_loss"]
    ck = load_checkpoint(result.checkpoint)
    assert ck.meta["step"] == 6 and ck.meta["data_index"] == 36 and ck.optimizer_state is not None
    init = build_model(m, 3).state_dict()
    w = m.intermediate_size // 2
    for name, t in ck.model_state.items():
        if is_ffn_param(name):
            suffix = (lambda x: x[:, w:]) if "down_proj" in name else (lambda x: x[w:])
            prefix = (lambda x: x[:, :w]) if "down_proj" in name else (lambda x: x[:w])
            assert torch.equal(suffix(t), suffix(init[name])), name
            assert not torch.equal(prefix(t), prefix(init[name])), name
        else:
            assert not torch.equal(t, init[name]), name
