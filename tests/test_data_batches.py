"""Training samples: packing, next-token labels, document masking, split, blending proportions,
determinism, DP sharding (DP=1 sees exactly the union of the DP ranks) and exact resume.

Token ids encode where they come from: dataset * 10**6 + document * 1000 + position in document,
so every check can read provenance straight off the batch.
"""

from collections import Counter

import numpy as np
import pytest
import torch

from engine.config import ConfigError, from_dict, to_dict
from engine.data import (
    IGNORE_INDEX,
    Blend,
    DataConfig,
    TokenBatches,
    check_batch_layout,
    split_documents,
    write_indexed,
)


def _dataset(prefix, dataset_id, num_docs, seed):
    rng = np.random.default_rng(seed)
    docs = [dataset_id * 10**6 + doc * 1000 + np.arange(rng.integers(1, 60))
            for doc in range(num_docs)]
    write_indexed(prefix, docs, np.int32)
    return docs


NUM_DOCS = 30  # about 50 samples of 16 tokens per epoch: tests run through several epochs


@pytest.fixture(scope="module")
def prefixes(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    paths = [str(root / name) for name in "abc"]
    for dataset_id, path in enumerate(paths):
        _dataset(path, dataset_id, NUM_DOCS, seed=dataset_id)
    return paths


def _config(path, **kw):
    base = dict(path=path, seq_len=16, micro_batch=2, global_batch=8, split="90,10")
    return DataConfig(**{**base, **kw})


def _steps(batches, n):
    return [torch.cat([mb["input_ids"] for mb in batches.next_step()]) for _ in range(n)]


def test_labels_are_next_tokens_and_documents_pack_across_samples(prefixes):
    plain = TokenBatches(_config(prefixes[0]), seed=1)
    masked = TokenBatches(_config(prefixes[0], mask_across_documents=True), seed=1)
    crossings = 0
    for _ in range(5):
        for mb, mb_masked in zip(plain.next_step(), masked.next_step()):
            inputs, labels = mb["input_ids"], mb["labels"]
            assert inputs.shape == labels.shape == (2, 16) and inputs.dtype == torch.long
            assert torch.equal(labels[:, :-1], inputs[:, 1:])
            window = torch.cat([inputs, labels[:, -1:]], dim=1)
            steps = window[:, 1:] - window[:, :-1]
            starts = window[:, 1:] % 1000 == 0  # the next token opens a new document
            assert torch.all((steps == 1) | starts)  # contiguous inside a document
            crossings += int(starts.sum())
            assert torch.equal(mb_masked["input_ids"], inputs)
            assert torch.equal(mb_masked["labels"], labels.masked_fill(starts, IGNORE_INDEX))
    assert crossings > 0  # the check above was exercised


def test_epoch_covers_the_train_split_once_and_reshuffles(prefixes):
    cfg = _config(prefixes[0], micro_batch=1, global_batch=1)
    batches = TokenBatches(cfg, seed=3)
    source = batches.sources[0]
    n = source.samples_per_epoch
    epochs = [torch.cat(_steps(batches, n)) for _ in range(2)]
    train_docs = split_documents(NUM_DOCS, cfg.split)["train"]
    seen = epochs[0].flatten().tolist()
    assert len(set(seen)) == len(seen) == n * 16  # no token twice in an epoch
    assert {t // 1000 for t in seen} <= set(train_docs)
    dropped = int(source.dataset.lengths[list(train_docs)].sum()) - len(seen)
    assert 1 <= dropped <= 16  # only the tail that cannot fill a window (+ the last label)
    assert not torch.equal(epochs[0], epochs[1])


def test_train_and_valid_splits_are_disjoint(prefixes):
    assert split_documents(30, "90,10") == {"train": range(27), "valid": range(27, 30)}
    assert split_documents(5, "99,1") == {"train": range(4), "valid": range(4, 5)}
    assert split_documents(5, "1,0") == {"train": range(5), "valid": range(5, 5)}
    docs = {}
    for split in ("train", "valid"):
        batches = TokenBatches(_config(prefixes[0]), seed=0, split=split)
        docs[split] = {t // 1000 for t in torch.cat(_steps(batches, 3)).flatten().tolist()}
    assert docs["train"] <= set(range(27)) and docs["valid"] <= set(range(27, 30))
    assert docs["valid"]
    with pytest.raises(ConfigError, match="data.split: the valid split of .* has no documents"):
        TokenBatches(_config(prefixes[0], split="1,0"), seed=0, split="valid")


def test_blending_keeps_every_prefix_within_one_sample_of_its_share(prefixes):
    weights = [5.0, 3.0, 2.0]
    blend = Blend(weights)
    drawn = blend.take(1000)
    shares = np.asarray(weights) / sum(weights)
    counts = np.zeros(3)
    for n, (d, k) in enumerate(drawn, start=1):
        assert k == counts[d]  # each dataset's samples are taken in order
        counts[d] += 1
        assert np.all(np.abs(counts - shares * n) <= 1.0)
    # The same proportions in real batches, read off the token ids.
    cfg = _config(tuple(zip(weights, prefixes)), global_batch=10, micro_batch=5)
    tokens = torch.cat(_steps(TokenBatches(cfg, seed=0), 20))[:, 0] // 10**6
    assert Counter(tokens.tolist()) == {0: 100, 1: 60, 2: 40}


def test_same_seed_same_batches_other_seed_other_batches(prefixes):
    cfg = _config(tuple((1.0, p) for p in prefixes[:2]))
    first, again = (_steps(TokenBatches(cfg, seed=7), 4) for _ in range(2))
    other = _steps(TokenBatches(cfg, seed=8), 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("dp,micro_batch", [(2, 2), (2, 1), (4, 1), (4, 2)])
def test_dp_ranks_split_the_global_batch_that_dp1_sees(prefixes, dp, micro_batch):
    path = ((2.0, prefixes[0]), (1.0, prefixes[1]))
    single = TokenBatches(_config(path, micro_batch=8), seed=5)
    ranks = [TokenBatches(_config(path, micro_batch=micro_batch), seed=5, dp_rank=r, dp=dp)
             for r in range(dp)]
    for _ in range(12):
        reference = single.next_step()[0]["input_ids"]  # [8, seq]: the whole global batch
        per_rank = [rank.next_step() for rank in ranks]
        assert all(len(steps) == 8 // (micro_batch * dp) for steps in per_rank)
        # Megatron order: micro-batch m of rank r is samples m*mb*dp + r*mb + [0, mb).
        interleaved = [per_rank[r][m]["input_ids"] for m in range(len(per_rank[0]))
                       for r in range(dp)]
        assert torch.equal(torch.cat(interleaved), reference)
        assert len({row.tolist()[0] for row in reference}) == 8  # disjoint samples
    assert ranks[0].state_dict()["dataset0_samples"] > ranks[0].sources[0].samples_per_epoch


def test_resume_continues_exactly(prefixes):
    cfg = _config(tuple((1.0, p) for p in prefixes), micro_batch=2, global_batch=4)
    straight = TokenBatches(cfg, seed=11, dp_rank=1, dp=2)
    _steps(straight, 30)
    state = straight.state_dict()
    assert all(type(v) is int for v in state.values()) and state["consumed_samples"] == 120
    expected = _steps(straight, 40)
    for d, source in enumerate(straight.sources):  # resumed inside epoch 0, ran into epoch 1+
        assert state[f"dataset{d}_samples"] < source.samples_per_epoch
        assert straight.state_dict()[f"dataset{d}_samples"] > source.samples_per_epoch
    resumed = TokenBatches(cfg, seed=11, dp_rank=1, dp=2)
    resumed.load_state_dict(dict(state))
    assert all(torch.equal(a, b) for a, b in zip(expected, _steps(resumed, 40)))
    with pytest.raises(ValueError, match="expects"):
        TokenBatches(_config(prefixes[0]), seed=11).load_state_dict(state)


def test_config_validation_names_the_key(prefixes, tmp_path):
    cases = [
        (dict(global_batch=7, micro_batch=2), "data.global_batch: must be a multiple"),
        (dict(seq_len=0), "data.seq_len: must be >= 1"),
        (dict(split="98"), "data.split: must be two non-negative weights"),
        (dict(split="a,b"), "data.split"),
        (dict(split="1,inf"), "data.split"),
        (dict(path=[[1.0]]), r"data.path\[0\]: must be a \[weight, prefix\] pair"),
        (dict(path=[[0, "x"]]), r"data.path\[0\]: weight must be a number > 0"),
        (dict(vocab_size=100), "data.vocab_size"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            from_dict(DataConfig, {"path": prefixes[0], **overrides}, prefix="data")
    with pytest.raises(ConfigError, match="data.global_batch: must be a multiple of data.micro_batch"
                                          r" \* dp = 2 \* 3"):
        check_batch_layout(_config(prefixes[0]), dp=3)
    with pytest.raises(ConfigError, match="data.path: no indexed dataset at .*missing"):
        TokenBatches(_config(str(tmp_path / "missing")), seed=0)
    with pytest.raises(ConfigError, match="data.seq_len: the train split .* fewer than"):
        TokenBatches(_config(prefixes[0], seq_len=10**6), seed=0)
    blended = from_dict(DataConfig, {"path": [[0.7, prefixes[0]], [0.3, prefixes[1]]]})
    assert blended.path == ((0.7, prefixes[0]), (0.3, prefixes[1]))
    assert from_dict(DataConfig, to_dict(blended)) == blended
