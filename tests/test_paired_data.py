"""Paired data for a teacher with another tokenizer (engine/data/paired.py, tools/preprocess_data.py
--teacher-tokenizer): chunk by chunk, both tokenizations spell the text's bytes exactly; bad pairs
are one-line errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from engine.data import EOD_TOKEN, DataConfig, DataError, IndexedTokens, TokenBatches
from engine.data.corpus import train_byte_level_bpe
from engine.data.paired import NO_CHUNK, PairedDocuments, align, read_shared_vocab, token_bytes
from tools import preprocess_data

# Multi-byte characters, whitespace runs, and documents shorter than a window.
TEXTS = ["def add(a, b):\n    return a + b\n", "Ünïcode — text, with “quotes” and 日本語.",
         "x", "import os\n\n\n\tprint(os.getcwd())   # spaces\n", "é",
         "x = [i * i for i in range(10)]\n" * 3, "emoji 🙂🙂 and tabs\t\t\tend"]
STUDENT_VOCAB, TEACHER_VOCAB = 300, 420


def tokenizers_and_documents(root, texts, sizes: dict[str, int]) -> tuple[dict, list]:
    """({name: path of a byte-level BPE of that size trained on `texts`}, [one .txt per text])."""
    paths = {}
    for name, size in sizes.items():
        paths[name] = root / f"{name}.json"
        train_byte_level_bpe(texts * 4, vocab_size=size).save(str(paths[name]))
    inputs = []
    for i, text in enumerate(texts):
        inputs.append(root / f"doc{i}.txt")
        inputs[-1].write_text(text, encoding="utf-8")
    return paths, inputs


def make_paired(root, texts=TEXTS, *, student_vocab=STUDENT_VOCAB, teacher_vocab=TEACHER_VOCAB):
    """(prefix, student tokenizer path, teacher tokenizer path) of paired data over `texts`."""
    paths, inputs = tokenizers_and_documents(root, texts, {"student": student_vocab,
                                                           "teacher": teacher_vocab})
    prefix = root / "data" / "corpus"
    code = preprocess_data.main(["--input", *map(str, inputs), "--tokenizer", str(paths["student"]),
                                 "--teacher-tokenizer", str(paths["teacher"]), "--output-prefix",
                                 str(prefix), "--no-progress"])
    assert code == 0
    return prefix, paths["student"], paths["teacher"]


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    return make_paired(tmp_path_factory.mktemp("paired"))


def _tables(student_path, teacher_path):
    tables = []
    for path in (student_path, teacher_path):
        tokenizer = Tokenizer.from_file(str(path))
        tables.append(token_bytes(tokenizer, eod_id=tokenizer.token_to_id(EOD_TOKEN)))
    return tables


def _stream_bytes(texts):
    return b"".join(t.encode() + b"\0" for t in texts)


def test_the_tokenizers_differ_and_offsets_end_at_each_documents_bytes(paired):
    prefix, student_path, teacher_path = paired
    student, teacher = IndexedTokens(prefix), IndexedTokens(f"{prefix}.teacher")
    assert student.num_tokens != teacher.num_tokens
    for suffix in (".offsets", ".teacher_offsets"):
        ends = IndexedTokens(f"{prefix}{suffix}")
        for d, text in enumerate(TEXTS):
            assert int(ends[d][-1]) == len(text.encode()) + 1  # the EOD token's byte


# (teacher_len 3 cuts most teacher windows: the chunks past the cut are dropped)
@pytest.mark.parametrize(("seq_len", "mask", "teacher_len"),
                         [(4, False, 12), (8, False, 24), (16, True, 48), (8, False, 3)])
def test_every_chunk_spells_the_same_bytes_in_both_tokenizations(paired, seq_len, mask,
                                                                 teacher_len):
    prefix, student_path, teacher_path = paired
    s_table, t_table = _tables(student_path, teacher_path)
    cfg = DataConfig(path=str(prefix), seq_len=seq_len, micro_batch=2, global_batch=2,
                     split="100,0", mask_across_documents=mask)
    batches = TokenBatches(cfg, seed=3, teacher_len=teacher_len)
    text = _stream_bytes(TEXTS)
    checked = 0
    for _ in range(6):
        for mb in batches.next_step():
            for r in range(mb["labels"].shape[0]):
                checked += _check_row(mb, r, s_table, t_table, text)
    assert checked > (5 if teacher_len < seq_len else 20)


def _check_row(mb, r, s_table, t_table, text) -> int:
    s_chunks, t_chunks = mb["chunks"][r], mb["teacher_chunks"][r]
    nbytes = mb["chunk_bytes"][r]
    labels, t_labels = mb["labels"][r], mb["teacher_labels"][r]
    spelled = []
    for k in torch.nonzero(nbytes).flatten().tolist():
        s = b"".join(s_table[i] for i in labels[s_chunks == k].tolist())
        t = b"".join(t_table[i] for i in t_labels[t_chunks == k].tolist())
        assert s == t and len(s) == int(nbytes[k]) and s
        spelled.append(s)
    # the chunks are consecutive bytes of the stream, in order (unless one was skipped)
    assert b"".join(spelled) in text or (labels == -100).any()
    assert all(chunk in text for chunk in spelled)
    # a token in no chunk is at the window's edges, or in a chunk skipped for its label
    inside = torch.nonzero(s_chunks != NO_CHUNK).flatten()
    if len(inside):
        gap = s_chunks[inside.min():inside.max() + 1] == NO_CHUNK
        assert not gap.any() or (labels == -100).any()
    assert (labels[s_chunks != NO_CHUNK] != -100).all()
    scored = labels != -100
    assert mb["label_bytes"][r][scored].tolist() == [len(s_table[i]) for i in labels[scored]]
    assert (mb["label_bytes"][r][~scored] == 0).all()
    return len(spelled)


def test_teacher_window_covers_the_student_window(paired):
    prefix, *_ = paired
    cfg = DataConfig(path=str(prefix), seq_len=8, micro_batch=1, global_batch=1, split="100,0")
    mb = TokenBatches(cfg, seed=0, teacher_len=32).next_step()[0]
    ids = mb["teacher_input_ids"][0][mb["teacher_labels"][0] != -100]
    assert len(ids) > 0 and (mb["chunks"] != NO_CHUNK).sum() > 0


def test_align_by_hand():
    # student tokens "ab|c|de", teacher "a|bc|d|e" over bytes 0..5; the first token is context
    student = np.array([0, 2, 3, 5])
    teacher = np.array([0, 1, 3, 4, 5])
    s, t, nbytes = align(student, teacher)
    # scored: student "c", "de"; teacher "bc", "d", "e"; common boundaries 3, 5
    assert s.tolist() == [NO_CHUNK, 0] and t.tolist() == [NO_CHUNK, 0, 0]
    assert nbytes.tolist() == [2]


def _copy(src, dst, suffixes):
    for suffix in suffixes:
        for ext in (".bin", ".idx"):
            shutil.copy(f"{src}{suffix}{ext}", f"{dst}{suffix}{ext}")


def test_documents_that_differ_are_one_line_errors(paired, tmp_path):
    prefix, *_ = paired
    other, *_ = make_paired(tmp_path, TEXTS[:-1] + ["another last document"])
    mixed = tmp_path / "mixed"
    _copy(prefix, mixed, ("", ".teacher", ".offsets"))
    _copy(other, mixed, (".teacher_offsets",))
    with pytest.raises(DataError, match="does not match|bytes in the teacher"):
        PairedDocuments(IndexedTokens(mixed))
    alone = tmp_path / "alone"
    _copy(prefix, alone, ("",))
    with pytest.raises(DataError, match="needs paired data"):
        PairedDocuments(IndexedTokens(alone))


def test_a_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import models

    tokenizer = Tokenizer(models.WordLevel({"日本": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="byte-level"):
        token_bytes(tokenizer, eod_id=None)


def test_a_teacher_that_spells_other_bytes_stops_preprocessing(tmp_path, capsys):
    from tokenizers import normalizers

    student, teacher = tmp_path / "student.json", tmp_path / "teacher.json"
    train_byte_level_bpe(TEXTS, vocab_size=STUDENT_VOCAB).save(str(student))
    lowercasing = train_byte_level_bpe(TEXTS, vocab_size=TEACHER_VOCAB)
    lowercasing.normalizer = normalizers.Lowercase()
    lowercasing.save(str(teacher))
    (tmp_path / "doc.txt").write_text("Upper Case Text\n")
    prefix = tmp_path / "out" / "corpus"
    code = preprocess_data.main(["--input", str(tmp_path / "doc.txt"), "--tokenizer", str(student),
                                 "--teacher-tokenizer", str(teacher), "--output-prefix",
                                 str(prefix), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "spell different bytes" in err
    assert not list(prefix.parent.iterdir())


def test_single_token_chunks_point_at_the_teachers_same_token(paired):
    s_table, t_table = _tables(*paired[1:])
    marked = list(_marked(paired[0], "single", seed=5, teacher_len=24))
    for mb, r, p in marked:
        q = int(mb["single"][r, p])
        k = int(mb["chunks"][r, p])
        assert int(mb["teacher_chunks"][r, q]) == k
        assert (mb["chunks"][r] == k).sum() == 1 == (mb["teacher_chunks"][r] == k).sum()
        assert s_table[int(mb["labels"][r, p])] == t_table[int(mb["teacher_labels"][r, q])]
    assert len(marked) > 10


def _marked(prefix, key: str, *, seed: int, teacher_len: int, steps: int = 4):
    """(micro-batch, row, position) of every entry of mb[key] other than NO_CHUNK, over `steps`
    steps of two windows of 8 tokens."""
    cfg = DataConfig(path=str(prefix), seq_len=8, micro_batch=2, global_batch=2, split="100,0")
    batches = TokenBatches(cfg, seed=seed, teacher_len=teacher_len)
    for _ in range(steps):
        for mb in batches.next_step():
            for r, p in torch.nonzero(mb[key] != NO_CHUNK).tolist():
                yield mb, r, p


def test_the_shared_vocabulary_pairs_tokens_of_the_same_bytes(paired):
    prefix, student_path, teacher_path = paired
    s_table, t_table = _tables(student_path, teacher_path)
    pairs = read_shared_vocab(str(prefix))
    assert len(pairs) > 200 and len(set(pairs[:, 0])) == len(pairs) == len(set(pairs[:, 1]))
    assert all(s_table[s] == t_table[t] and s_table[s] for s, t in pairs.tolist())
    eod = [Tokenizer.from_file(str(p)).token_to_id(EOD_TOKEN) for p in (student_path, teacher_path)]
    assert eod in pairs.tolist()


def test_chunk_ends_are_where_both_models_have_read_the_chunk(paired):
    s_table, t_table = _tables(*paired[1:])
    marked = list(_marked(paired[0], "chunk_ends", seed=2, teacher_len=12))
    for mb, r, k in marked:
        p, q = int(mb["chunk_ends"][r, k]), int(mb["teacher_chunk_ends"][r, k])
        # the inputs up to p and q end with chunk k's last token in both
        s_last = mb["labels"][r][mb["chunks"][r] == k][-1]
        t_last = mb["teacher_labels"][r][mb["teacher_chunks"][r] == k][-1]
        assert mb["input_ids"][r, p] == s_last and mb["teacher_input_ids"][r, q] == t_last
        s_text = b"".join(s_table[i] for i in mb["input_ids"][r, :p + 1].tolist())
        t_text = b"".join(t_table[i] for i in mb["teacher_input_ids"][r, :q + 1].tolist())
        assert s_text.endswith(t_text) or t_text.endswith(s_text)
    assert len(marked) > 10
