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

`mapped_kl` takes the chunks that are one token in both tokenizations, where both models predict
the chunk from the same text. Each side's next-token distribution is coarsened to the shared
vocabulary S (token pairs that stand for the same bytes, PREFIX.shared_vocab.npy) plus one bucket
holding the mass of every unshared token, and the two (|S| + 1)-bucket distributions are compared
by forward KL(teacher || student) or reverse KL. Under TP each rank takes the pairs whose
*student* id lies in its vocabulary shard (`SharedVocabShard`); the teacher's logits of those
pairs come from its final hidden states and the matching rows of its output weight, gathered
once (`teacher_pair_logits`). Per token a handful of all-reduces of one float each: exact under
TP, nothing of size tokens x vocabulary moves.

`uld` (Universal Logit Distillation) takes the same chunks: the L1 distance between the two
models' probabilities sorted decreasing, truncated to the top k and zero-padded; under TP an exact
distributed top-k (each shard's k largest, one all_gather, the k largest of those).

Activation pairs compare both models at the chunks' ends (`aligned_buffers`): each model's
activation at the input position of a chunk's last token, where both have read the same text.

Every placement of the teacher meets the term through the same few statistics of a micro-batch
(`STATS`, `CrossTokenizerTerm.teacher_stats`), on the student's grid: its chunk NLLs (bits per
byte), and for likelihood its chunk log-likelihoods at T, for uld its top-k probabilities at the
single-token chunks, for mapped_kl its head input there (the pairs' logits need its output
weight). A colocated teacher's are taken on the student ranks; teacher ranks stream them
(distill/teacher_wire.py); an offline store holds them per sample (distill/offline.py). So each
placement computes the same loss.

Bits per byte: a model's negative log-likelihood of the chunks' text, over the chunks' bytes, in
bits; both models score the same bytes, so their values compare across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from distill.divergence import cross_entropy
from distill.teacher import TeacherOutputs
from engine import collectives as C
from engine.collectives import Group
from engine.data.paired import NO_CHUNK
from engine.mappings import copy_to_tp, gather_from_sp_replicated, reduce_from_tp, scatter_to_sp
from layers.buffers import ActivationBuffer
from layers.softcap import softcap

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
    ll_t = chunk_sums(teacher_log_probs.detach(), alignment["teacher_chunks"], num_chunks)
    return student_likelihood_loss(student_log_probs, ll_t, alignment, divergence=divergence)


def student_likelihood_loss(student_log_probs: torch.Tensor, teacher_chunk_ll: torch.Tensor,
                            alignment: Mapping[str, torch.Tensor], *,
                            divergence: str = "binary_kl") -> torch.Tensor:
    """`likelihood_loss` from the teacher's chunk log-likelihoods [batch, seq] (chunk k of a row
    at k: what teacher ranks and offline stores hand over)."""
    ll_s = chunk_sums(student_log_probs, alignment["chunks"], alignment["chunk_bytes"].shape[1])
    div = chunk_divergence(ll_s, teacher_chunk_ll, divergence=divergence)
    return torch.where(alignment["chunk_bytes"] > 0, div, torch.zeros_like(div))


def chunk_nll_bits(token_nll: torch.Tensor, chunks: torch.Tensor,
                   chunk_bytes: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood, in bits, of the micro-batch's chunks (a sum), from per-token
    nats `token_nll` [batch, L] and its chunk ids: divide the step's sum by its chunk bytes for
    bits per byte."""
    nll = chunk_sums(token_nll.detach().float(), chunks, chunk_bytes.shape[1])
    return (nll * (chunk_bytes > 0)).sum() / math.log(2)


# --------------------------------------------------------------------------------- mapped_kl

@dataclass(frozen=True)
class SharedVocabShard:
    """This rank's part of the shared vocabulary: the pairs whose student id is in its shard."""

    student_cols: torch.Tensor  # [K_r] columns of the student's logits shard
    teacher_ids: torch.Tensor  # [K_r] the paired global teacher ids
    student_unshared: torch.Tensor  # [Vs/tp] bool: real columns of the shard outside the pairs
    teacher_unshared: torch.Tensor  # [Vt/tp] bool: the same of the teacher's shard

    @classmethod
    def of(cls, pairs: torch.Tensor, *, student_shard: int, teacher_shard: int,
           student_vocab: int, teacher_vocab: int, group: Group = None) -> SharedVocabShard:
        """From the [K, 2] (student id, teacher id) pairs and each side's columns per rank."""
        rank = C.group_rank(group)

        def unshared(shard: int, vocab: int, ids: torch.Tensor) -> torch.Tensor:
            first = rank * shard
            columns = torch.arange(first, first + shard)
            return (columns < vocab) & ~torch.isin(columns, ids)

        s_first = rank * student_shard
        mine = (pairs[:, 0] >= s_first) & (pairs[:, 0] < s_first + student_shard)
        return cls(pairs[mine, 0] - s_first, pairs[mine, 1],
                   unshared(student_shard, student_vocab, pairs[:, 0]),
                   unshared(teacher_shard, teacher_vocab, pairs[:, 1]))

    def to(self, device: torch.device) -> SharedVocabShard:
        return SharedVocabShard(*(x.to(device) for x in (self.student_cols, self.teacher_ids,
                                                         self.student_unshared,
                                                         self.teacher_unshared)))


def teacher_pair_logits(teacher_hidden: torch.Tensor, pair_weight: torch.Tensor,
                        cap: float | None) -> torch.Tensor:
    """[n, K_r] the teacher's logits of this rank's pairs from its head input [n, hidden] and the
    output-weight rows of the pairs' teacher ids [K_r, hidden] (capped as its head caps)."""
    return softcap(teacher_hidden.float() @ pair_weight.float().T, cap)


def _shifted_exp(logits: torch.Tensor, real: torch.Tensor,
                 group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(logits - top) over the real columns, 0 on padding [n, V/tp]; top [n], the row max over
    every shard, a constant) of scaled vocab-sharded logits."""
    masked = logits.masked_fill(~real, float("-inf"))
    top = C.all_reduce(masked.detach().amax(dim=-1), group, op="max")  # [n]
    return (masked - top[:, None]).exp(), top


def _log_mass(x: torch.Tensor) -> torch.Tensor:
    # No unshared column at all (the same tokenizer, or a vocabulary inside the other's): a mass
    # of 1e-38 of the normalizer instead of 0 keeps the logarithm and its gradient finite. The
    # divergence then changes by ~1e-36, or where it is infinite (the other side has unshared
    # mass m) it is a large finite ~87 m.
    return x.clamp_min(torch.finfo(x.dtype).tiny).log()


def mapped_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              teacher_pair_logits: torch.Tensor, shard: SharedVocabShard, *,
              kind: str = "forward_kl", temperature: float = 1.0, student_vocab: int,
              teacher_vocab: int, group: Group = None) -> torch.Tensor:
    """[n] KL between the teacher's and the student's next-token distributions coarsened to the
    shared vocabulary + one bucket (module docstring), from the student's [n, Vs/tp] and the
    teacher's [n, Vt/tp] logits shards at n matched positions and `teacher_pair_logits` [n, K_r].
    `kind`: forward_kl KL(teacher || student) | reverse_kl KL(student || teacher).

    Every rank-local sum is reduced over TP before it meets a value that every rank holds, so
    the reductions' backward (identity) hands each rank the gradient of its own shard."""
    if kind not in ("forward_kl", "reverse_kl"):
        raise ValueError(f"mapped_kl kind must be forward_kl or reverse_kl (got {kind!r})")
    with torch.no_grad():  # the teacher: log-probabilities of this rank's pairs, unshared mass
        t = teacher_logits.float() / temperature
        exp_t, top_t = _shifted_exp(t, _real_columns(t.shape[-1], teacher_vocab, group, t.device),
                                    group)
        sums_t = C.all_reduce(torch.stack([exp_t.sum(-1), (exp_t * shard.teacher_unshared).sum(-1)],
                                          dim=-1), group)
        log_z_t = top_t + sums_t[:, 0].log()
        log_p_t = teacher_pair_logits.float() / temperature - log_z_t[:, None]  # [n, K_r]
        log_rest_t = top_t + _log_mass(sums_t[:, 1]) - log_z_t
    z = student_logits.float() / temperature
    exp_s, top_s = _shifted_exp(z, _real_columns(z.shape[-1], student_vocab, group, z.device),
                                group)
    shifted = z[:, shard.student_cols] - top_s[:, None]  # [n, K_r]: log p_s + log S
    pair_exp = exp_s[:, shard.student_cols]
    if kind == "forward_kl":  # sum p_t (log p_t - log p_s) = sum p_t (log p_t - shifted) + P_t log S
        p_t = log_p_t.exp()
        local = [(p_t * (log_p_t - shifted)).sum(-1), p_t.sum(-1)]
    else:  # sum p_s (log p_s - log p_t) = [sum u (shifted - log p_t) - U log S] / S, u = e^shifted
        local = [(pair_exp * (shifted - log_p_t)).sum(-1), pair_exp.sum(-1)]
    sums = reduce_from_tp(torch.stack([exp_s.sum(-1), (exp_s * shard.student_unshared).sum(-1),
                                       *local], dim=-1), group)  # [n, 4], the same on every rank
    total, unshared, first, second = sums.unbind(-1)
    log_total = total.log()
    log_rest_s = _log_mass(unshared) - log_total
    if kind == "forward_kl":
        return first + second * log_total + log_rest_t.exp() * (log_rest_t - log_rest_s)
    return (first - second * log_total) / total + log_rest_s.exp() * (log_rest_s - log_rest_t)


def _real_columns(shard: int, vocab: int, group: Group, device: torch.device) -> torch.Tensor:
    first = C.group_rank(group) * shard
    return torch.arange(first, first + shard, device=device) < vocab


# -------------------------------------------------------------------------------------- uld

def _top_k(values_shard: torch.Tensor, k: int, group: Group) -> tuple[torch.Tensor, ...]:
    """The k largest of each row of a vocab-sharded [n, V/tp] (detached): (values [n, k]
    decreasing, zero-padded past the vocabulary; whether each is in this rank's shard [n, k];
    its column there [n, k]). One all_gather of k floats per row: exact, and the same choice on
    every rank."""
    kk = min(k, values_shard.shape[-1])
    local, columns = values_shard.topk(kk, dim=-1)  # [n, kk]
    gathered = C.all_gather(local.contiguous(), group, dim=-1)  # [n, tp * kk]
    top, where = gathered.topk(min(k, gathered.shape[-1]), dim=-1)
    mine = where // kk == C.group_rank(group)
    column = columns.gather(1, where % kk)
    pad = k - top.shape[-1]
    if pad:  # a vocabulary smaller than k: zero probabilities
        top = torch.nn.functional.pad(top, (0, pad))
        mine = torch.nn.functional.pad(mine, (0, pad))
        column = torch.nn.functional.pad(column, (0, pad))
    return top, mine, column


def _probs(logits: torch.Tensor, vocab: int, temperature: float, group: Group) -> torch.Tensor:
    """softmax(logits / T) of a vocab shard [n, V/tp], 0 on padding; the normalizer's gradient
    is summed over the ranks (each rank's loss holds its own columns' part of it)."""
    z = logits.float() / temperature
    exp, _ = _shifted_exp(z, _real_columns(z.shape[-1], vocab, group, z.device), group)
    total = reduce_from_tp(copy_to_tp(exp.sum(-1), group), group)
    return exp / total[:, None]


def teacher_top_probs(teacher_logits: torch.Tensor, *, top_k: int, temperature: float,
                      vocab: int, group: Group = None) -> torch.Tensor:
    """[n, top_k] the teacher's top_k probabilities (softmax(logits / T)) sorted decreasing,
    zero-padded, from its vocab-sharded [n, Vt/tp] logits: all of the teacher `uld` needs."""
    with torch.no_grad():
        top, _, _ = _top_k(_probs(teacher_logits, vocab, temperature, group), top_k, group)
    return top


def uld(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, top_k: int,
        temperature: float = 1.0, student_vocab: int, teacher_vocab: int,
        group: Group = None) -> torch.Tensor:
    """[n] Universal Logit Distillation: sum_i |p_s,(i) - p_t,(i)| over the i < top_k largest
    probabilities of each model, sorted decreasing (zero-padded), from vocab-sharded [n, Vs/tp]
    and [n, Vt/tp] logits at matched positions. The value is the same on every rank; each rank's
    gradient reaches the student columns of its shard among the top k."""
    teacher_top = teacher_top_probs(teacher_logits, top_k=top_k, temperature=temperature,
                                    vocab=teacher_vocab, group=group)
    return uld_to_top(student_logits, teacher_top, temperature=temperature,
                      student_vocab=student_vocab, group=group)


def uld_to_top(student_logits: torch.Tensor, teacher_top: torch.Tensor, *,
               temperature: float = 1.0, student_vocab: int, group: Group = None) -> torch.Tensor:
    """`uld` from the teacher's `teacher_top_probs` [n, k] (what teacher ranks stream)."""
    p_s = _probs(student_logits, student_vocab, temperature, group)
    student_top, mine, column = _top_k(p_s.detach(), teacher_top.shape[-1], group)
    own = p_s.gather(1, column).masked_fill(~mine, 0.0)  # [n, k]: with grad where mine
    student_top = torch.where(mine, own, student_top)
    return (student_top - teacher_top).abs().sum(-1)


# ------------------------------------------------------------------------------ activations

def aligned_buffers(student: Mapping[str, ActivationBuffer],
                    teacher: Mapping[str, ActivationBuffer | torch.Tensor],
                    alignment: Mapping[str, torch.Tensor], group: Group = None,
                    ) -> tuple[dict[str, ActivationBuffer], dict[str, ActivationBuffer]]:
    """Both models' activation buffers at the chunk ends: slot k of a row holds each model's
    activation at the input position of chunk k's last token ("chunk_ends",
    "teacher_chunk_ends"; slots without one hold any row, the activation terms mask them out).
    The student's keep its layout (sequence-sharded under SP: gathered, picked, scattered again,
    the gradient going back the same way); the teacher's come replicated."""
    ends, teacher_ends = alignment["chunk_ends"], alignment["teacher_chunk_ends"]
    out_s = {}
    for name, buf in student.items():
        full = gather_from_sp_replicated(buf.tensor, group, seq_dim=buf.seq_dim) \
            if buf.seq_sharded else buf.tensor
        picked = _at(full, ends, buf.seq_dim)
        out_s[name] = ActivationBuffer(
            scatter_to_sp(picked, group, seq_dim=buf.seq_dim) if buf.seq_sharded else picked,
            buf.seq_sharded, buf.seq_dim)
    return out_s, teacher_at_chunk_ends(teacher, teacher_ends, group)


def teacher_at_chunk_ends(teacher: Mapping[str, ActivationBuffer | torch.Tensor],
                          teacher_ends: torch.Tensor, group: Group = None,
                          ) -> dict[str, ActivationBuffer | torch.Tensor]:
    """The teacher's buffers over its window at the chunk ends `teacher_ends` [batch, seq],
    replicated. A bare tensor was picked by the teacher ranks already (`ChunkStatsTeacher`) and
    arrives in the student buffer's layout: it passes as is."""
    out = {}
    for name, buf in teacher.items():
        if not isinstance(buf, ActivationBuffer):
            out[name] = buf
            continue
        full = C.all_gather(buf.tensor, group, dim=buf.seq_dim) if buf.seq_sharded else buf.tensor
        out[name] = ActivationBuffer(_at(full, teacher_ends, buf.seq_dim), False, buf.seq_dim)
    return out


def _at(x: torch.Tensor, positions: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """x [batch, seq_x, width] at `positions` [batch, seq] (NO_CHUNK: position 0)."""
    if seq_dim != 1:
        raise ValueError(f"buffers are [batch, seq, width] here (seq_dim 1, got {seq_dim})")
    index = positions.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1])
    return x.gather(1, index)


# ------------------------------------------------------------------------ the objective's term

@dataclass
class ChunkSums:
    """One micro-batch's sums for the chunk term (the objective divides them by the step's
    global counts): the divergence (over `TokenCounts.chunks`, or `.single_chunks` for mapped_kl
    and uld) and each model's negative log-likelihood of the chunks' text in bits (over
    `.chunk_bytes`)."""

    divergence: torch.Tensor
    student_bits: torch.Tensor
    teacher_bits: torch.Tensor


STATS = {  # what each loss needs of the teacher per micro-batch (`CrossTokenizerTerm.teacher_stats`)
    "likelihood": ("chunk_nll", "chunk_ll"),
    "mapped_kl": ("chunk_nll", "single_hidden"),
    "uld": ("chunk_nll", "single_top"),
}


class CrossTokenizerTerm:
    """The chunk term of a run (`distill.cross_tokenizer`): from the student's logits shard, the
    teacher's statistics of the micro-batch (`teacher_stats`, which teacher ranks and offline
    stores hand over ready; a colocated teacher's are taken here from its head input and output
    weight shard over its own window), and the alignment."""

    def __init__(self, *, loss: str, divergence: str, kind: str, student_vocab: int,
                 teacher_vocab: int, group: Group = None, uld_top_k: int = 64,
                 shared_vocab: torch.Tensor | None = None):
        if loss == "mapped_kl" and shared_vocab is None:
            raise ValueError("mapped_kl needs the shared vocabulary (PREFIX.shared_vocab.npy)")
        self.loss, self.divergence, self.kind, self.group = loss, divergence, kind, group
        self.uld_top_k = uld_top_k
        self.student_vocab, self.teacher_vocab = student_vocab, teacher_vocab
        self.shared_vocab = shared_vocab  # [K, 2] (student id, teacher id)
        self._shard: SharedVocabShard | None = None
        self._pair_weight: torch.Tensor | None = None  # [K_r, hidden_t], gathered once

    @torch.no_grad()
    def teacher_stats(self, teacher: TeacherOutputs, *, temperature: float,
                      names: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """What the loss needs of the teacher (`names`, default STATS[loss]; an offline export
        takes those of every loss but mapped_kl), every rank of `group` the same:
        "chunk_nll" [batch, seq] its negative log-likelihood of chunk k of the row at k, at T = 1
        (its bits per byte); likelihood: "chunk_ll" [batch, seq] its chunk log-likelihoods at T;
        at each student position of a single-token chunk (0 elsewhere), uld: "single_top"
        [batch, seq, uld_top_k] its top probabilities at T sorted decreasing, mapped_kl:
        "single_hidden" [batch, seq, hidden_t] its head input (the student side forms the
        logits of the pairs and the buckets from it)."""
        align = teacher.alignment
        t_logits = softcap(teacher.head_hidden @ teacher.output_weight.T, teacher.softcap) \
            if teacher.logits is None else teacher.logits  # [batch, seq_t, Vt/tp]
        names = STATS[self.loss] if names is None else names
        num_chunks = align["chunk_bytes"].shape[1]
        teacher_nll = cross_entropy(t_logits, align["teacher_labels"],
                                    vocab_size=self.teacher_vocab, group=self.group)
        stats = {"chunk_nll": chunk_sums(teacher_nll.float(), align["teacher_chunks"],
                                         num_chunks)}
        if "chunk_ll" in names:
            lp = -teacher_nll if temperature == 1.0 else \
                token_log_probs(t_logits, align["teacher_labels"], temperature=temperature,
                                vocab_size=self.teacher_vocab, group=self.group)
            stats["chunk_ll"] = chunk_sums(lp.float(), align["teacher_chunks"], num_chunks)
        rows, positions, teacher_positions = _single_positions(align["single"])
        if "single_top" in names:
            top = teacher_top_probs(t_logits[rows, teacher_positions], top_k=self.uld_top_k,
                                    temperature=temperature, vocab=self.teacher_vocab,
                                    group=self.group)
            stats["single_top"] = _on_student_grid(top, align["single"], rows, positions)
        if "single_hidden" in names:
            hidden = teacher.head_hidden[rows, teacher_positions]  # [n, hidden_t]
            stats["single_hidden"] = _on_student_grid(hidden, align["single"], rows, positions)
        return stats

    def __call__(self, student_logits: torch.Tensor, teacher: TeacherOutputs, *,
                 student_ce: torch.Tensor, temperature: float) -> ChunkSums:
        """`student_ce` [batch, seq]: the student's cross-entropy of its labels at T = 1."""
        align = teacher.alignment
        stats = teacher.chunk_stats if teacher.chunk_stats is not None else \
            self.teacher_stats(teacher, temperature=temperature)
        real = align["chunk_bytes"] > 0
        bits = [chunk_nll_bits(student_ce, align["chunks"], align["chunk_bytes"]),
                (stats["chunk_nll"] * real).sum() / math.log(2)]
        if self.loss == "likelihood":
            student_lp = -student_ce if temperature == 1.0 else \
                token_log_probs(student_logits, align["labels"], temperature=temperature,
                                vocab_size=self.student_vocab, group=self.group)
            div = student_likelihood_loss(student_lp, stats["chunk_ll"], align,
                                          divergence=self.divergence)
        else:
            rows, positions, _ = _single_positions(align["single"])
            student_at = student_logits[rows, positions]  # [n, Vs/tp]
            if self.loss == "uld":
                div = uld_to_top(student_at, stats["single_top"][rows, positions],
                                 temperature=temperature, student_vocab=self.student_vocab,
                                 group=self.group)
            else:
                div = self._mapped(student_at, stats["single_hidden"][rows, positions], teacher,
                                   temperature)
        return ChunkSums(div.sum(), *bits)

    def _mapped(self, student_at: torch.Tensor, teacher_hidden: torch.Tensor,
                teacher: TeacherOutputs, temperature: float) -> torch.Tensor:
        """mapped_kl at the n single-token chunks, from the student's logits [n, Vs/tp] and the
        teacher's head input [n, hidden_t] there (with its output weight shard)."""
        t_logits = softcap(teacher_hidden @ teacher.output_weight.T, teacher.softcap)
        shard = self._shard_for(student_at, t_logits, teacher)
        return mapped_kl(student_at, t_logits,
                         teacher_pair_logits(teacher_hidden, self._pair_weight, teacher.softcap),
                         shard, kind=self.kind, temperature=temperature,
                         student_vocab=self.student_vocab, teacher_vocab=self.teacher_vocab,
                         group=self.group)

    def _shard_for(self, student_logits, t_logits, teacher: TeacherOutputs) -> SharedVocabShard:
        """This rank's pairs, and the teacher's output-weight rows of them (one all_gather of the
        frozen weight, the first time)."""
        if self._shard is None:
            self._shard = SharedVocabShard.of(
                self.shared_vocab, student_shard=student_logits.shape[-1],
                teacher_shard=t_logits.shape[-1], student_vocab=self.student_vocab,
                teacher_vocab=self.teacher_vocab, group=self.group).to(student_logits.device)
            full = C.all_gather(teacher.output_weight.detach(), self.group, dim=0)
            self._pair_weight = full[self._shard.teacher_ids].clone()  # [K_r, hidden_t]
        return self._shard


def _single_positions(single: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, student positions, teacher positions) [n] of the single-token chunks, from the
    micro-batch's "single" [batch, seq] (the teacher's position of each, or NO_CHUNK)."""
    rows, positions = torch.nonzero(single != NO_CHUNK, as_tuple=True)
    return rows, positions, single[rows, positions]


def _on_student_grid(values: torch.Tensor, single: torch.Tensor, rows: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """[batch, seq, width]: `values` [n, width] of the single-token chunks at their student
    positions, 0 elsewhere (a shape that does not depend on the text, for the wire)."""
    out = values.new_zeros(*single.shape, values.shape[-1])
    out[rows, positions] = values
    return out
