"""The cross-tokenizer chunk losses (distill/cross_tokenizer.py) against their float64 definition
on the gathered vocabularies, values and gradients, at TP 1/2/4 with padded vocabularies, on the
alignment of two byte-level BPEs of different sizes trained in the test."""

from __future__ import annotations

import math

import pytest
import torch

from distill import cross_tokenizer as X
from distill.divergence import divergence
from engine import collectives as C
from engine.data import DataConfig, TokenBatches
from engine.data.paired import NO_CHUNK, read_shared_vocab
from engine.spawn import run_ranks
from tests.references import vocab_shard, world_group
from tests.test_paired_data import STUDENT_VOCAB, TEACHER_VOCAB, make_paired

PAD = 8  # padded vocabularies: the next multiple of PAD (and of every TP degree tested)


def _padded(vocab: int) -> int:
    return -(-vocab // PAD) * PAD + PAD


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    return make_paired(tmp_path_factory.mktemp("xtok"))[0]


@pytest.fixture(scope="module")
def shared_pairs(prefix):
    """Four fifths of the shared vocabulary: the smaller BPE's tokens are all in the larger's, and
    with no unshared student token the forward KL is infinite whenever the teacher has some."""
    pairs = torch.from_numpy(read_shared_vocab(str(prefix)))
    assert len(pairs) == STUDENT_VOCAB
    return pairs[torch.arange(len(pairs)) % 5 != 0]


@pytest.fixture(scope="module")
def micro_batch(prefix):
    cfg = DataConfig(path=str(prefix), seq_len=12, micro_batch=3, global_batch=3, split="100,0")
    return TokenBatches(cfg, seed=1, teacher_len=24).next_step()[0]


def _logits(rows: int, length: int, vocab: int, seed: int) -> torch.Tensor:
    """[rows, length, padded] logits, peaked enough that some chunks are near-certain, with
    garbage in the padding columns (which must not count)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, length, _padded(vocab), generator=g, dtype=torch.float64) * 3
    x[..., vocab:] = 50.0
    return x


def _reference(student, teacher, mb, *, divergence, temperature):
    """Float64 chunk divergences [rows, seq] by their definition, loops over chunks."""
    ls = torch.log_softmax(student[..., :STUDENT_VOCAB] / temperature, dim=-1)
    lt = torch.log_softmax(teacher[..., :TEACHER_VOCAB] / temperature, dim=-1)
    out = torch.zeros(mb["chunk_bytes"].shape, dtype=torch.float64)
    for r in range(out.shape[0]):
        for k in torch.nonzero(mb["chunk_bytes"][r]).flatten().tolist():
            pos_s = torch.nonzero(mb["chunks"][r] == k).flatten()
            pos_t = torch.nonzero(mb["teacher_chunks"][r] == k).flatten()
            ll_s = ls[r, pos_s, mb["labels"][r, pos_s]].sum().clamp(max=X.MAX_CHUNK_LOG_PROB)
            ll_t = lt[r, pos_t, mb["teacher_labels"][r, pos_t]].sum().clamp(max=X.MAX_CHUNK_LOG_PROB)
            p_s, p_t = ll_s.exp(), ll_t.exp()
            value = 0.0
            if divergence in ("binary_kl", "both"):
                value = value + p_t * torch.log(p_t / p_s) \
                    + (1 - p_t) * torch.log((1 - p_t) / (1 - p_s))
            if divergence in ("log_ratio", "both"):
                value = value + (ll_t - ll_s).abs()
            out[r, k] = value
    return out


def _check_likelihood(mb, kind, temperature) -> None:
    """`kind`: the chunk divergence."""
    group = world_group()
    rows = mb["labels"].shape[0]
    s_full = _logits(rows, mb["labels"].shape[1], STUDENT_VOCAB, 1)
    t_full = _logits(rows, mb["teacher_labels"].shape[1], TEACHER_VOCAB, 2)
    weights = 0.5 + torch.rand(mb["chunk_bytes"].shape, generator=torch.Generator().manual_seed(3),
                               dtype=torch.float64)
    s_ref = s_full.clone().requires_grad_()
    ref = _reference(s_ref, t_full, mb, divergence=kind, temperature=temperature)
    (ref * weights).sum().backward()

    s = vocab_shard(s_full.float(), group).requires_grad_()
    t = vocab_shard(t_full.float(), group)
    with C.count_collectives() as calls:
        lp_s = X.token_log_probs(s, mb["labels"], temperature=temperature,
                                 vocab_size=STUDENT_VOCAB,
                                 group=group)
        lp_t = X.token_log_probs(t, mb["teacher_labels"], temperature=temperature,
                                 vocab_size=TEACHER_VOCAB, group=group)
    out = X.likelihood_loss(lp_s, lp_t, mb, divergence=kind)
    (out * weights.float()).sum().backward()
    # one vocab-parallel collective per model
    assert dict(calls.calls) == ({} if group is None else {"all_gather": 2})
    assert (mb["chunk_bytes"] > 0).sum() > 5
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), vocab_shard(s_ref.grad, group), rtol=1e-4,
                               atol=1e-5)


def _likelihood_grid(mb) -> bool:
    for kind in ("binary_kl", "log_ratio", "both"):
        for temperature in (1.0, 2.0):
            _check_likelihood(mb, kind, temperature)
    return True


def _at_tp(grid, tp: int, argument) -> list[bool]:
    """`grid(argument)` on each of `tp` spawned ranks (in this process for 1)."""
    return [grid(argument)] if tp == 1 else run_ranks(grid, tp, argument)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_likelihood_equals_its_float64_definition(micro_batch, tp):
    assert _at_tp(_likelihood_grid, tp, micro_batch) == [True] * tp


def test_identical_tokenizers_give_one_token_chunks_and_the_per_token_log_ratio(tmp_path):
    prefix, *_ = make_paired(tmp_path, teacher_vocab=STUDENT_VOCAB)
    cfg = DataConfig(path=str(prefix), seq_len=10, micro_batch=2, global_batch=2, split="100,0")
    mb = TokenBatches(cfg, seed=0, teacher_len=10).next_step()[0]
    # the same tokens: chunk k is scored token k of both (the first, a boundary at the window's
    # start, and nothing is cut)
    inside = mb["chunks"] != NO_CHUNK
    assert torch.equal(mb["teacher_labels"], mb["labels"])
    assert torch.equal(mb["chunks"][inside], torch.arange(10).expand(2, 10)[inside])
    assert torch.equal(mb["teacher_chunks"], mb["chunks"])
    lp_s = -torch.rand(2, 10, dtype=torch.float64) * 3
    lp_t = -torch.rand(2, 10, dtype=torch.float64) * 3
    out = X.likelihood_loss(lp_s, lp_t, mb, divergence="log_ratio")
    torch.testing.assert_close(out[inside], (lp_t - lp_s).abs()[inside])


def test_bits_per_byte_counts_the_chunks_bytes(micro_batch):
    nll = torch.rand(micro_batch["labels"].shape, dtype=torch.float64)
    inside = micro_batch["chunks"] != NO_CHUNK
    bits = X.chunk_nll_bits(nll, micro_batch["chunks"], micro_batch["chunk_bytes"])
    assert math.isclose(float(bits), float(nll[inside].sum()) / math.log(2), rel_tol=1e-6)


# ------------------------------------------------------------------------------------ mapped_kl

def _mapped_reference(student, teacher, pairs, *, kind, temperature, student_vocab, teacher_vocab):
    """Float64 KL of the (|S| + 1)-bucket distributions, on the full vocabularies."""
    def buckets(logits, vocab, ids):
        p = torch.softmax(logits[..., :vocab] / temperature, dim=-1)
        unshared = torch.ones(vocab, dtype=torch.bool)
        unshared[ids] = False
        return torch.cat([p[..., ids], p[..., unshared].sum(-1, keepdim=True)], dim=-1)

    p_s = buckets(student, student_vocab, pairs[:, 0])
    p_t = buckets(teacher, teacher_vocab, pairs[:, 1])
    p, q = (p_t, p_s) if kind == "forward_kl" else (p_s, p_t)
    return (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(-1)  # 0 log 0 = 0 (no unshared token)


def _check_mapped(pairs, kind, temperature, student_vocab, teacher_vocab) -> None:
    group, n = world_group(), 7
    s_full = _logits(1, n, student_vocab, 4)[0]
    t_full = _logits(1, n, teacher_vocab, 5)[0]
    weights = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s_ref = s_full.clone().requires_grad_()
    ref = _mapped_reference(s_ref, t_full, pairs, kind=kind, temperature=temperature,
                            student_vocab=student_vocab, teacher_vocab=teacher_vocab)
    (ref * weights).sum().backward()
    shard = X.SharedVocabShard.of(pairs, student_shard=_padded(student_vocab) // C.group_size(group),
                                teacher_shard=_padded(teacher_vocab) // C.group_size(group),
                                student_vocab=student_vocab, teacher_vocab=teacher_vocab,
                                group=group)
    s = vocab_shard(s_full.float(), group).requires_grad_()
    with C.count_collectives() as calls:
        out = X.mapped_kl(s, vocab_shard(t_full.float(), group), t_full[:, shard.teacher_ids].float(),
                          shard, kind=kind, temperature=temperature, student_vocab=student_vocab,
                          teacher_vocab=teacher_vocab, group=group)
    (out * weights.float()).sum().backward()
    # a max and a sum of a few floats per token for each model, nothing of the vocabulary's size
    assert dict(calls.calls) == ({} if group is None else {"all_reduce": 4})
    assert calls.total_bytes == (0 if group is None else 4 * n * (1 + 2 + 1 + 4))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s.grad.double(), vocab_shard(s_ref.grad, group), rtol=1e-4,
                               atol=1e-5)


def _mapped_grid(pairs) -> bool:
    identity = torch.arange(STUDENT_VOCAB).repeat(2, 1).T
    for kind in ("forward_kl", "reverse_kl"):
        for temperature in (1.0, 2.0):
            _check_mapped(pairs, kind, temperature, STUDENT_VOCAB, TEACHER_VOCAB)
            # the same tokenizer: today's divergence on the full vocabulary
            _check_mapped(identity, kind, temperature, STUDENT_VOCAB, STUDENT_VOCAB)
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mapped_kl_equals_its_float64_definition(shared_pairs, tp):
    assert _at_tp(_mapped_grid, tp, shared_pairs) == [True] * tp


def test_mapped_kl_of_the_same_tokenizer_is_the_full_divergence():
    s_full, t_full = (_logits(1, 5, STUDENT_VOCAB, seed)[0].float() for seed in (8, 9))
    identity = torch.arange(STUDENT_VOCAB).repeat(2, 1).T
    shard = X.SharedVocabShard.of(identity, student_shard=s_full.shape[-1],
                                teacher_shard=t_full.shape[-1], student_vocab=STUDENT_VOCAB,
                                teacher_vocab=STUDENT_VOCAB)
    for kind in ("forward_kl", "reverse_kl"):
        got = X.mapped_kl(s_full, t_full, t_full[:, shard.teacher_ids], shard, kind=kind,
                        temperature=2.0, student_vocab=STUDENT_VOCAB, teacher_vocab=STUDENT_VOCAB)
        want = divergence(s_full, t_full, kind=kind, temperature=2.0, vocab_size=STUDENT_VOCAB)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ uld

def _uld_reference(student, teacher, *, top_k, temperature):
    def top(logits, vocab):
        p = torch.softmax(logits[..., :vocab] / temperature, dim=-1).sort(dim=-1,
                                                                           descending=True).values
        return torch.nn.functional.pad(p, (0, max(top_k - vocab, 0)))[..., :top_k]

    return (top(student, STUDENT_VOCAB) - top(teacher, TEACHER_VOCAB)).abs().sum(-1)


def _check_uld(top_k, temperature) -> None:
    group, n = world_group(), 6
    s_full = _logits(1, n, STUDENT_VOCAB, 10)[0] / 3  # flatter: the top k matter
    t_full = _logits(1, n, TEACHER_VOCAB, 11)[0] / 3
    weights = 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    s_ref = s_full.clone().requires_grad_()
    ref = _uld_reference(s_ref, t_full, top_k=top_k, temperature=temperature)
    (ref * weights).sum().backward()
    s = vocab_shard(s_full.float(), group).requires_grad_()
    out = X.uld(s, vocab_shard(t_full.float(), group), top_k=top_k, temperature=temperature,
                student_vocab=STUDENT_VOCAB, teacher_vocab=TEACHER_VOCAB, group=group)
    (out * weights.float()).sum().backward()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), vocab_shard(s_ref.grad, group), rtol=1e-4,
                               atol=1e-6)


def _uld_grid(_) -> bool:
    for top_k in (1, 8, 100, 500):  # 500: past the student's vocabulary (zero-padded)
        for temperature in (1.0, 2.0):
            _check_uld(top_k, temperature)
    return True


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_uld_equals_its_float64_definition(tp):
    assert _at_tp(_uld_grid, tp, None) == [True] * tp


# ---------------------------------------------------------------------------------- activations

def test_activation_buffers_are_taken_at_both_chunk_ends(micro_batch):
    from layers.buffers import ActivationBuffer

    rows, seq = micro_batch["labels"].shape
    student = torch.randn(rows, seq, 4, dtype=torch.float64)
    teacher = torch.randn(rows, micro_batch["teacher_labels"].shape[1], 6, dtype=torch.float64)
    out_s, out_t = X.aligned_buffers({"a": ActivationBuffer(student, False)},
                                     {"b": ActivationBuffer(teacher, False)}, micro_batch)
    ends, t_ends = micro_batch["chunk_ends"], micro_batch["teacher_chunk_ends"]
    valid = torch.nonzero(ends != NO_CHUNK).tolist()
    assert len(valid) > 5
    for r, k in valid:
        assert torch.equal(out_s["a"].tensor[r, k], student[r, ends[r, k]])
        assert torch.equal(out_t["b"].tensor[r, k], teacher[r, t_ends[r, k]])
