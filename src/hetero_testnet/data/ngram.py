"""Unigram and bigram reference losses: what token frequencies alone, and one token of context, score.

A language model that has learned nothing beyond how often each token occurs scores the unigram
cross-entropy; one that has learned which token tends to follow which scores about the bigram's.
Reports draw both beside the model's validation loss, so a reader can tell "learned" from "matched
word frequencies" (issue 14: the tier-mix models sat at 6.954 against a 6.960-nat unigram table).

Both models are fitted on the training split only, hyperparameters included:
- unigram, add-k: `p(w) = (c(w) + k) / (N + k V)`;
- bigram, interpolated with that unigram: `p(w | v) = lam * c(v, w) / c(v) + (1 - lam) * p(w)`, and
  `p(w)` alone when `v` never occurs as a context.
`k` (a log grid from 1e-3 to 10) and `lam` (0.01 to 0.99) are chosen by the log-likelihood of the
last `holdout` share of the training tokens under counts from the rest; the final counts then use
the whole training split. Nothing is fitted on validation tokens.

They are scored on exactly the (context, target) pairs validation scores the model on: the caller
passes the validation samples as `evaluate` reads them, (n, T + 1) ids; targets are `[:, 1:]`, and a
target's bigram context is the token before it, `[:, :-1]`, always inside the same sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

K_GRID = tuple(float(k) for k in np.geomspace(1e-3, 10.0, 41))
LAMBDA_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))
HOLDOUT = 0.1


@dataclass(frozen=True, slots=True)
class NgramReference:
    unigram_loss: float
    """Mean nats per target token of the add-k unigram."""
    bigram_loss: float
    """Mean nats per target token of the interpolated bigram."""
    unigram_k: float
    bigram_lambda: float
    train_tokens: int
    targets: int


def _unigram_logp(tokens: np.ndarray, vocab_size: int, k: float) -> np.ndarray:
    counts = np.bincount(tokens, minlength=vocab_size).astype(np.float64)
    return np.log((counts + k) / (counts.sum() + k * vocab_size))


def _pairs(tokens: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted pair keys `v * V + w`, their counts, and each context's count, from a token stream."""
    keys = tokens[:-1].astype(np.int64) * vocab_size + tokens[1:].astype(np.int64)
    uniq, counts = np.unique(keys, return_counts=True)
    context = np.bincount(tokens[:-1], minlength=vocab_size)
    return uniq, counts, context


def _ml_bigram(fit: tuple[np.ndarray, np.ndarray, np.ndarray], prev: np.ndarray, nxt: np.ndarray,
               vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood `c(v, w) / c(v)` per pair (0 for unseen pairs) and whether `v` was seen."""
    uniq, counts, context = fit
    keys = prev.astype(np.int64) * vocab_size + nxt.astype(np.int64)
    pos = np.clip(np.searchsorted(uniq, keys), 0, len(uniq) - 1)
    pair = np.where(uniq[pos] == keys, counts[pos], 0).astype(np.float64)
    ctx = context[prev].astype(np.float64)
    seen = ctx > 0
    return np.divide(pair, ctx, out=np.zeros_like(pair), where=seen), seen


def _bigram_nll(p_ml: np.ndarray, seen: np.ndarray, p_uni: np.ndarray, lam: float) -> float:
    p = np.where(seen, lam * p_ml + (1.0 - lam) * p_uni, p_uni)
    return float(-np.mean(np.log(p)))


def fit_hyperparameters(train: np.ndarray, vocab_size: int, holdout: float = HOLDOUT) -> tuple[float, float]:
    """(k, lam) maximising the likelihood of the training split's last `holdout` share under counts
    from the rest (module docstring)."""
    cut = int(len(train) * (1.0 - holdout))
    fit_part, held = train[:cut], train[cut:]
    held_targets = held[1:]
    nll_k = [float(-np.mean(_unigram_logp(fit_part, vocab_size, k)[held_targets])) for k in K_GRID]
    k = K_GRID[int(np.argmin(nll_k))]
    p_uni = np.exp(_unigram_logp(fit_part, vocab_size, k))[held_targets]
    p_ml, seen = _ml_bigram(_pairs(fit_part, vocab_size), held[:-1], held_targets, vocab_size)
    nll_lam = [_bigram_nll(p_ml, seen, p_uni, lam) for lam in LAMBDA_GRID]
    return k, LAMBDA_GRID[int(np.argmin(nll_lam))]


def ngram_reference(train: np.ndarray, val_samples: np.ndarray, vocab_size: int) -> NgramReference:
    """Unigram and bigram cross-entropy of the validation samples (n, T + 1), fitted on `train`."""
    train = np.asarray(train)
    val_samples = np.asarray(val_samples)
    if train.ndim != 1 or len(train) < 3 or val_samples.ndim != 2 or val_samples.shape[1] < 2:
        raise ValueError("need a 1-D training stream of >= 3 tokens and (n, T + 1) validation samples")
    k, lam = fit_hyperparameters(train, vocab_size)
    prev, targets = val_samples[:, :-1].reshape(-1), val_samples[:, 1:].reshape(-1)
    logp_uni = _unigram_logp(train, vocab_size, k)
    p_ml, seen = _ml_bigram(_pairs(train, vocab_size), prev, targets, vocab_size)
    return NgramReference(unigram_loss=float(-np.mean(logp_uni[targets])),
                          bigram_loss=_bigram_nll(p_ml, seen, np.exp(logp_uni)[targets], lam),
                          unigram_k=k, bigram_lambda=lam, train_tokens=int(len(train)),
                          targets=int(len(targets)))
