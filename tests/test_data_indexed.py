"""Indexed datasets: byte-compatible with megatron-core both ways, checked reads, atomic writes."""

import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.data import DataError, IndexedTokens, IndexedWriter, dtype_for_vocab, write_indexed

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

DTYPES = [np.uint8, np.uint16, np.int32, np.int64]


def _megatron_write(prefix: Path, documents: list[np.ndarray], dtype) -> None:
    builder = megatron_indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for ids in documents:
        builder.add_document(torch.from_numpy(ids.astype(np.int64)), [len(ids)])
    builder.finalize(f"{prefix}.idx")


@settings(max_examples=25, deadline=None)
@given(dtype=st.sampled_from(DTYPES),
       # megatron-core cannot map an empty .bin: at least one token in all
       lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12).filter(any),
       seed=st.integers(0, 2**16))
def test_bytes_match_megatron_builder_and_both_readers_agree(dtype, lengths, seed):
    rng = np.random.default_rng(seed)
    high = min(np.iinfo(dtype).max, 70000)
    documents = [rng.integers(0, high, size=n).astype(dtype) for n in lengths]
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = Path(tmp, "ours"), Path(tmp, "theirs")
        assert write_indexed(ours, documents, dtype) == (len(documents), sum(lengths))
        _megatron_write(theirs, documents, dtype)
        for suffix in (".bin", ".idx"):
            assert Path(f"{ours}{suffix}").read_bytes() == Path(f"{theirs}{suffix}").read_bytes()
        reader, megatron_reader = IndexedTokens(theirs), megatron_indexed.IndexedDataset(str(ours))
        assert len(reader) == len(megatron_reader) == len(documents)
        assert reader.dtype == np.dtype(dtype) and reader.num_tokens == sum(lengths)
        for i, ids in enumerate(documents):
            np.testing.assert_array_equal(reader[i], ids)
            np.testing.assert_array_equal(megatron_reader[i], ids)
        np.testing.assert_array_equal(reader.document_indices, np.arange(len(documents) + 1))


def test_dtype_follows_vocab_size_like_megatron():
    for vocab in (300, 65499, 65500, 200_000):
        assert dtype_for_vocab(vocab) == megatron_indexed.DType.optimal_dtype(vocab)


def test_failed_write_leaves_nothing(tmp_path):
    prefix = tmp_path / "out" / "data"
    with pytest.raises(DataError, match="do not fit uint16"):
        write_indexed(prefix, [np.array([1, 2]), np.array([70000])], np.uint16)
    with pytest.raises(RuntimeError), IndexedWriter(prefix, np.uint16) as writer:
        writer.add(np.array([1, 2, 3]))
        raise RuntimeError("interrupted")
    with pytest.raises(DataError, match="no documents"):
        write_indexed(prefix, [], np.uint16)
    assert list((tmp_path / "out").iterdir()) == []


def test_bad_files_are_one_clear_error(tmp_path):
    prefix = tmp_path / "data"
    with pytest.raises(DataError, match=r"data\.idx not found"):
        IndexedTokens(prefix)
    write_indexed(prefix, [np.arange(5), np.arange(3)], np.uint16)
    bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated or mismatched"):
        IndexedTokens(prefix)
    index = idx_path.read_bytes()
    idx_path.write_bytes(b"NOTANIDX!" + index[9:])
    with pytest.raises(DataError, match="bad magic"):
        IndexedTokens(prefix)
    idx_path.write_bytes(index[:40])
    with pytest.raises(DataError, match="is truncated"):
        IndexedTokens(prefix)
    idx_path.write_bytes(b"")
    with pytest.raises(DataError, match="too short"):
        IndexedTokens(prefix)
