"""Distillation from a teacher with another tokenizer, on aligned chunks of text.

The micro-batch carries the alignment (engine/data/paired.py): the teacher's own window of tokens
over the same bytes, and for every scored token of either model the chunk it belongs to (chunks:
the smallest spans whose ends are token boundaries in both tokenizations). Per chunk c,

    ll_s(c) = sum over the student's tokens x in c of log softmax(z_s / T)[x]     (the same for
    ll_t(c)   with the teacher's tokens and logits)

is each model's log-likelihood of the chunk's text given the same preceding text. `likelihood`
compares them per chunk:

    binary_kl   KL(Bernoulli(P_t) || Bernoulli(P_s)), P = exp(ll): the chunk as one event
                = P_t (ll_t - ll_s) + (1 - P_t) (log(1 - P_t) - log(1 - P_s))
    log_ratio   |ll_t - ll_s|
    both        their sum

Chunk log-likelihoods are capped at MAX_CHUNK_LOG_PROB, so that log(1 - P) stays finite. Each
model's token log-probabilities are one vocab-parallel `cross_entropy` (one all_gather of a few
floats per token over TP); the sums per chunk are local (every TP rank holds every token's value),
so the loss is exact under TP. Gradients reach the student's logits only.

Bits per byte: a model's negative log-likelihood of the chunks' text, over the chunks' bytes, in
bits; both models score the same bytes, so their values compare across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from distill.divergence import cross_entropy
from engine.collectives import Group
from engine.data.paired import NO_CHUNK

MAX_CHUNK_LOG_PROB = -1e-6  # chunk probabilities are capped at 1 - 1e-6 (log(1 - P) finite)
DIVERGENCES = ("binary_kl", "log_ratio", "both")


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0,
                    vocab_size: int | None = None, group: Group = None) -> torch.Tensor:
    """[batch, seq] log softmax(logits / T)[label] of vocab-sharded logits [batch, seq, V/tp];
    0 where the label is ignored."""
    scaled = logits if temperature == 1.0 else logits.float() / temperature
    return -cross_entropy(scaled, labels, vocab_size=vocab_size, group=group)


def chunk_sums(per_token: torch.Tensor, chunks: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """[batch, num_chunks] the sums of `per_token` [batch, L] over each row's chunks, from the
    chunk id of every position `chunks` [batch, L] (NO_CHUNK: in none)."""
    inside = chunks != NO_CHUNK
    values = torch.where(inside, per_token, torch.zeros_like(per_token))
    out = per_token.new_zeros(per_token.shape[0], num_chunks)
    return out.scatter_add(1, torch.where(inside, chunks, torch.zeros_like(chunks)), values)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler's switch at -log 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_divergence(student_ll: torch.Tensor, teacher_ll: torch.Tensor, *,
                     divergence: str = "binary_kl") -> torch.Tensor:
    """Per-chunk divergence of the chunk log-likelihoods (same shape; see the module docstring)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES} (got {divergence!r})")
    ll_s = student_ll.clamp(max=MAX_CHUNK_LOG_PROB)
    ll_t = teacher_ll.detach().clamp(max=MAX_CHUNK_LOG_PROB)
    out = torch.zeros_like(ll_s)
    if divergence in ("binary_kl", "both"):
        p_t = ll_t.exp()
        out = out + p_t * (ll_t - ll_s) + (1 - p_t) * (log1mexp(ll_t) - log1mexp(ll_s))
    if divergence in ("log_ratio", "both"):
        out = out + (ll_t - ll_s).abs()
    return out


def likelihood_loss(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor,
                    alignment: Mapping[str, torch.Tensor], *,
                    divergence: str = "binary_kl") -> torch.Tensor:
    """[batch, seq] the divergence of each chunk at its index (0 where no chunk), from each model's
    `token_log_probs` of its own labels (student [batch, seq], teacher [batch, seq_t]) and the
    micro-batch's alignment ("chunks", "teacher_chunks", "chunk_bytes"; engine/data/dataset.py)."""
    num_chunks = alignment["chunk_bytes"].shape[1]
    ll_s = chunk_sums(student_log_probs, alignment["chunks"], num_chunks)
    ll_t = chunk_sums(teacher_log_probs.detach(), alignment["teacher_chunks"], num_chunks)
    div = chunk_divergence(ll_s, ll_t, divergence=divergence)
    return torch.where(alignment["chunk_bytes"] > 0, div, torch.zeros_like(div))


def chunk_nll_bits(token_nll: torch.Tensor, chunks: torch.Tensor,
                   chunk_bytes: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood, in bits, of the micro-batch's chunks (a sum), from per-token
    nats `token_nll` [batch, L] and its chunk ids: divide the step's sum by its chunk bytes for
    bits per byte."""
    nll = chunk_sums(token_nll.detach().float(), chunks, chunk_bytes.shape[1])
    return (nll * (chunk_bytes > 0)).sum() / math.log(2)
