"""Parameter counts and training FLOPs per token of a model at each MatFormer tier.

Training FLOPs per token follow Kaplan et al. 2020 (arXiv 2001.08361, Table 1) and PaLM (Chowdhery
et al. 2022, Appendix B): `6 * N_matmul + 12 * L * C * T`, where N_matmul counts the weights of
every matrix multiply a token goes through (attention projections, the FFN prefix a tier computes,
the LM head; not the embedding lookup, not the norms), 6 = 2 (multiply-add) x 3 (forward, and
backward for activations and for weights), and the second term is the attention score and value
products (QK^T and AV) over a context of T tokens, without discounting the causal mask. All tiers
hold every parameter; tier t computes only the first `intermediate_size >> t` FFN neurons.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetero_testnet.config import ModelConfig
from hetero_testnet.model.matformer import ffn_width


@dataclass(frozen=True, slots=True)
class TierCost:
    tier: int
    ffn_width: int
    parameters: int
    """Every parameter of the model (the same at every tier)."""
    embedding: int
    head: int
    attention: int
    ffn_computed: int
    """FFN weights this tier multiplies by (gate, up and down of its neuron prefix, every layer)."""
    matmul_params: int
    train_flops_per_token: int

    def relative_to(self, other: "TierCost") -> float:
        return self.train_flops_per_token / other.train_flops_per_token


def tier_cost(cfg: ModelConfig, tier: int) -> TierCost:
    """Parameter counts and training FLOPs per token of `cfg` at `tier` (module docstring)."""
    C, L, T, V = cfg.hidden_size, cfg.num_hidden_layers, cfg.max_seq_len, cfg.vocab_size
    width = ffn_width(cfg.intermediate_size, tier)
    embedding = head = V * C
    attention = L * 4 * C * C                      # q, k, v, o projections
    ffn_full = L * 3 * C * cfg.intermediate_size   # SwiGLU gate, up, down
    ffn_computed = L * 3 * C * width
    norms = (2 * L + 1) * C
    matmul = head + attention + ffn_computed
    return TierCost(tier=tier, ffn_width=width, parameters=embedding + head + attention + ffn_full + norms,
                    embedding=embedding, head=head, attention=attention, ffn_computed=ffn_computed,
                    matmul_params=matmul, train_flops_per_token=6 * matmul + 12 * L * C * T)
