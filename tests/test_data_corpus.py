"""The bundled stdlib corpus: real text round-trips through its trained BPE, the cache is hit, a
failed build leaves nothing, concurrent builders build once, and training batches read it."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from engine.data import EOD_TOKEN, DataConfig, IndexedTokens, TokenBatches, resolve_data_path
from engine.data import corpus as corpus_module
from engine.data.corpus import default_corpus, stdlib_sources

SMALL = 150_000  # bytes of stdlib text: a fraction of a second to build


def test_builds_real_text_that_decodes_back(tmp_path):
    prefix, tokenizer_path = default_corpus(tmp_path, 320, max_bytes=SMALL, progress=False)
    root, names = stdlib_sources()
    assert all("site-packages" not in name for name in names)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert tokenizer.get_vocab_size() == 320 and tokenizer.token_to_id(EOD_TOKEN) == 0
    dataset = IndexedTokens(prefix)
    assert dataset.dtype == np.uint16 and len(dataset) >= 2 and dataset.num_tokens > SMALL // 6
    files = json.loads((prefix.parent / "meta.json").read_text())["files"]
    assert len(files) == len(dataset) and files == [n for n in names if n in set(files)]
    assert sum((root / name).stat().st_size for name in files) <= SMALL
    for i in range(len(dataset)):  # documents are whole files, in the fixed hashed order
        ids = dataset[i].tolist()
        assert ids[-1] == 0 and 0 not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == (root / files[i]).read_text()


def test_cache_is_reused_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    first = default_corpus(tmp_path, 300, max_bytes=SMALL, progress=False)
    monkeypatch.setattr(corpus_module, "_build", lambda *a, **k: pytest.fail("rebuilt"))
    assert default_corpus(tmp_path, 300, max_bytes=SMALL, progress=False) == first
    monkeypatch.undo()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corpus_module, "encode_to_indexed", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_corpus(tmp_path, 310, max_bytes=SMALL, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [first[0].parent.name]


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    builds, results = [], []
    build = corpus_module._build
    monkeypatch.setattr(corpus_module, "_build", lambda *a: builds.append(1) or build(*a))
    threads = [threading.Thread(target=lambda: results.append(
        default_corpus(tmp_path, 300, max_bytes=SMALL, progress=False))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and len(results) == 2 and results[0] == results[1]


def test_default_path_feeds_training_batches(tmp_path):
    cfg = DataConfig(path="default", cache_dir=str(tmp_path), vocab_size=300,
                     corpus_max_bytes=SMALL, seq_len=32, micro_batch=2, global_batch=4,
                     split="80,20")
    [(weight, prefix)] = resolve_data_path(cfg)
    assert weight == 1.0 and Path(prefix).parent.parent == tmp_path
    for split in ("train", "valid"):
        step = TokenBatches(cfg, seed=0, split=split).next_step()
        assert len(step) == 2 and step[0]["input_ids"].shape == (2, 32)
        assert int(step[0]["input_ids"].max()) < 300
