"""LLaMA-style NanoGPT ("NanoGPT-20M"), in one file, with MatFormer-elastic FFNs.

What "correct" means: the architecture of Hugging Face's `LlamaForCausalLM` (transformers
`models/llama/modeling_llama.py`) at Psyche's HfNanoGPT sizes: pre-norm RMSNorm computed in fp32,
SwiGLU MLP `down(silu(gate(x)) * up(x))` (Shazeer 2020, arXiv:2002.05202), rotary position
embeddings in the rotate-half convention (Su et al. 2021, arXiv:2104.09864), causal scaled
dot-product attention, no biases, untied embedding and head. Parameter names are Hugging Face's, so
a checkpoint loads there unchanged and `checkpoint.py` is one loop.

MatFormer: `forward` and `loss` take a `NeuronSet`; the FFN then computes only those neurons while
every parameter keeps its full shape, so uncomputed neurons get exactly zero gradient (slicing and
`index_select` backpropagate by scattering into zeros).

Shape letters: B batch, T sequence, C hidden, nh heads, hs head size, I FFN width (of the neurons
computed), V vocabulary, N = B*T tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hetero_testnet.config import ModelConfig
from hetero_testnet.errors import ConfigError
from hetero_testnet.model.matformer import NeuronSet

LOSS_CHUNK_TOKENS = 1024
"""Tokens per chunk of the fused head + cross-entropy (0 = unchunked). A (1024, 50257) fp32 logits
chunk is 0.2 GB instead of 1.2 GB for the whole 6,144-token batch; see `_ChunkedHeadCrossEntropy`.
Measured on 2 cores (NanoGPT-20M, 12 x 512 tokens, forward + backward, median of 3): unchunked
12.2 s; chunks of 512 / 1024 / 2048 tokens 6.9 / 6.3 / 6.6 s; 4096 slower again."""


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): `w * x / sqrt(mean(x^2) + eps)`, computed in fp32 as HF Llama."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_seq_len, head_dim) for RoPE: frequency theta^(-2i/hs), duplicated for rotate-half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.int64).float(), inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hs/2}) by position-dependent angles: x*cos + rotate_half(x)*sin."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE on q and k (no GQA: nh key/value heads)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C = cfg.hidden_size
        self.n_head = cfg.num_attention_heads
        self.q_proj = nn.Linear(C, C, bias=False)
        self.k_proj = nn.Linear(C, C, bias=False)
        self.v_proj = nn.Linear(C, C, bias=False)
        self.o_proj = nn.Linear(C, C, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q = self.q_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU FFN, `down(silu(gate(x)) * up(x))`, elastic in its hidden (neuron) dimension."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x: torch.Tensor, selection: int | torch.Tensor | None = None) -> torch.Tensor:
        """`selection`: None = all neurons, an int w = the first w (tier prefix), a LongTensor = those ids."""
        gate, up, down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight  # (I,C) (I,C) (C,I)
        if isinstance(selection, int):
            if selection < gate.shape[0]:
                # prefix: slices are views; their backward scatters into a zero full-shape gradient
                gate, up, down = gate[:selection], up[:selection], down[:, :selection]
        elif selection is not None:
            selection = selection.to(gate.device)
            gate, up, down = gate.index_select(0, selection), up.index_select(0, selection), \
                down.index_select(1, selection)
        h = F.silu(F.linear(x, gate)) * F.linear(x, up)  # (B, T, I)
        return F.linear(h, down)  # (B, T, C)


class Block(nn.Module):
    """Pre-norm residual block: attention, then FFN."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                selection: int | torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x), selection)
        return x


class Decoder(nn.Module):
    """Embedding, blocks and final norm: HF's `LlamaModel` (the `model.` prefix of every name)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `h @ W^T` against targets, chunk by chunk, gradients computed in forward.

    The (N, V) fp32 logits are the largest tensors of a step (1.2 GB at 6,144 tokens x 50,257) and
    the cross-entropy over them is memory-bound (perf-facts.md). Since the loss is the last op, its
    gradient wrt the logits, `(softmax - onehot) / N`, is known in the forward pass: each chunk's
    logits are made, turned into their gradient in place and consumed by the two gradient matmuls
    before the next chunk, so at most one (chunk, V) buffer exists (the softmax is made in place: a
    `log_softmax` beside the logits doubled the head's peak, 0.4 GB per 1024-token chunk). This is
    the "fused linear cross-entropy" idea (as in Liger-Kernel). Backward only scales the stored
    gradients by the incoming scalar. The math equals `F.cross_entropy(h @ W^T, targets)` up to
    summation order.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                need_h: bool, need_w: bool) -> torch.Tensor:
        N = h.shape[0]  # h (N, C), weight (V, C), targets (N,)
        acc = torch.float32 if h.device.type == "mps" else torch.float64  # MPS has no float64
        loss_sum = torch.zeros((), dtype=acc, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for s in range(0, N, chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]  # (n, C), (n,)
            logits = F.linear(hc, weight)  # (n, V): the only (n, V) buffer, everything below is in place
            target_logit = logits.gather(1, tc.unsqueeze(1))  # (n, 1)
            peak = logits.amax(dim=1, keepdim=True)  # (n, 1)
            probs = logits.sub_(peak).exp_()  # exp(logit - max)
            total = probs.sum(dim=1, keepdim=True)  # (n, 1)
            loss_sum -= (target_logit - peak - total.log()).sum(dtype=acc)  # -log softmax at the targets
            if need_h or need_w:
                g = probs.div_(total)  # softmax
                g.scatter_add_(1, tc.unsqueeze(1), torch.full_like(total, -1.0))  # softmax - onehot
                g.mul_(1.0 / N)  # d(mean loss)/d(logits)
                if need_h:
                    torch.mm(g, weight, out=grad_h[s:s + chunk])  # (n, C)
                if need_w:
                    grad_w.addmm_(g.t(), hc)  # (V, C)
        ctx.save_for_backward(grad_h, grad_w)
        return (loss_sum / N).to(h.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors  # used once (no retain_graph): scaled in place, no copies
        gh = grad_h.mul_(grad_out) if grad_h is not None else None
        gw = grad_w.mul_(grad_out) if grad_w is not None else None
        return gh, gw, None, None, None, None


class NanoGPT(nn.Module):
    """HF `LlamaForCausalLM` at NanoGPT sizes; `neurons` selects the FFN neurons a MatFormer tier computes."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # derived from the config, so not part of the state dict (HF does the same); computed only on
        # a real device (on meta, RoPE's arithmetic would import torch._dynamo: `uninitialised_model`)
        shape = (cfg.max_seq_len, cfg.hidden_size // cfg.num_attention_heads)
        self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(shape), persistent=False)
        if not self.rope_cos.is_meta:
            self.init_buffers()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Every matrix normal(0, init_std) (embedding and head too), norms 1; RoPE tables recomputed.

        Parameters are drawn in registration order from `generator` only, so the weights depend on
        its seed alone (not on the global RNG, the thread count or the process).
        """
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, self.config.init_std, generator=generator)
            else:
                p.fill_(1.0)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Recompute the RoPE tables (needed after materialising a model built on the meta device)."""
        cfg = self.config
        cos, sin = rope_cache(cfg.hidden_size // cfg.num_attention_heads, cfg.max_seq_len, cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def hidden_states(self, input_ids: torch.Tensor, neurons: NeuronSet | None = None) -> torch.Tensor:
        """Final-norm output (B, T, C) for token ids (B, T)."""
        B, T = input_ids.shape
        if T > self.config.max_seq_len:
            raise ConfigError(f"sequence length {T} exceeds the model's max_seq_len {self.config.max_seq_len}")
        full = neurons is None or neurons.is_full(self.config.intermediate_size)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, None if full else neurons.layer_selection(i))
        return self.model.norm(x)

    def forward(self, input_ids: torch.Tensor, neurons: NeuronSet | None = None) -> torch.Tensor:
        """Logits (B, T, V) in fp32."""
        return self.lm_head(self.hidden_states(input_ids, neurons)).float()

    def loss(self, tokens: torch.Tensor, neurons: NeuronSet | None = None, *,
             chunk_tokens: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
        """Mean next-token cross-entropy over all B*T targets of `tokens` (B, T+1), logits in fp32.

        Inputs are `tokens[:, :-1]`, targets `tokens[:, 1:]`. `chunk_tokens` > 0 uses the fused
        chunked head (same value and gradients, a fraction of the memory traffic); 0 is the plain
        `F.cross_entropy` over full logits, kept as the reference it is tested against.
        """
        h = self.hidden_states(tokens[:, :-1], neurons)  # (B, T, C)
        targets = tokens[:, 1:].reshape(-1)  # (N,)
        h = h.reshape(-1, h.shape[-1]).float()  # (N, C)
        weight = self.lm_head.weight.float()  # (V, C)
        if chunk_tokens <= 0:
            return F.cross_entropy(F.linear(h, weight), targets)
        grad_on = torch.is_grad_enabled()
        return _ChunkedHeadCrossEntropy.apply(h, weight, targets, chunk_tokens,
                                              grad_on and h.requires_grad, grad_on and weight.requires_grad)


def build_model(cfg: ModelConfig, seed: int) -> NanoGPT:
    """A freshly initialised model on CPU, identical for the same (cfg, seed) in any process or machine:
    every parameter is drawn from a local generator seeded with `seed` (`init_weights`)."""
    model = uninitialised_model(cfg)
    model.init_weights(torch.Generator(device="cpu").manual_seed(seed))
    return model


def uninitialised_model(cfg: ModelConfig) -> NanoGPT:
    """A model on CPU whose parameters are to be overwritten (by `init_weights` or a state dict).

    Built on CPU with torch's default init skipped (`_NoDefaultInit`: 0.1 s for the 20M config
    instead of 0.4 s, and no draw from the global RNG). Not on the meta device: there `to_empty`
    and RoPE's arithmetic run torch's Python reference ops, whose first use imports sympy and
    torch._dynamo (1.5-4 s of CPU per process; a 26 s median when 32 clients started on 2 cores).
    """
    with _NoDefaultInit():
        return NanoGPT(cfg)


class _NoDefaultInit(TorchFunctionMode):
    """Turns the random fills of modules' `reset_parameters` into no-ops (the memory stays as allocated)."""

    SKIPPED = frozenset({nn.init.kaiming_uniform_, nn.init.uniform_, nn.init.normal_,
                         torch.Tensor.uniform_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (all parameters are full shape at every tier)."""
    return sum(p.numel() for p in model.parameters())
