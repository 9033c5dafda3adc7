"""tools/preprocess_data.py: megatron-core reads back exactly what `tokenizers` produced; bad
inputs stop with one `error:` line, exit code 2 and no output left behind."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.data import EOD_TOKEN, IndexedTokens
from engine.data.corpus import train_byte_level_bpe

ROOT = Path(__file__).resolve().parents[1]
from tools import preprocess_data  # noqa: E402

megatron_indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset")

TEXTS = ["def add(a, b):\n    return a + b\n", "Ünïcode — text, with “quotes”.",
         "import os\nprint(os.getcwd())\n", "x = [i * i for i in range(10)]\n" * 3]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_byte_level_bpe(TEXTS * 4, vocab_size=300).save(str(path))
    return path


def _expected(tokenizer_path, texts, eod=True):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    suffix = [tokenizer.token_to_id(EOD_TOKEN)] if eod else []
    return [tokenizer.encode(text).ids + suffix for text in texts]


def _assert_dataset(prefix, expected):
    ours, megatron = IndexedTokens(prefix), megatron_indexed.IndexedDataset(str(prefix))
    assert len(ours) == len(megatron) == len(expected)
    for i, ids in enumerate(expected):
        assert megatron[i].tolist() == ids
        assert ours[i].tolist() == ids
    assert ours.dtype == np.uint16


@pytest.mark.parametrize("workers", [1, 2])
def test_jsonl_round_trips_through_megatron(tmp_path, tokenizer_path, workers):
    texts = TEXTS * 40  # several chunks, so the pool's ordering matters
    lines = [json.dumps({"id": i, "content": t}) for i, t in enumerate(texts)]
    parts = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    parts[0].write_text("\n".join(lines[:70]) + "\n\n")  # a blank line is no document
    parts[1].write_text("\n".join(lines[70:]))
    prefix = tmp_path / "out" / "corpus"
    code = preprocess_data.main(["--input", *map(str, parts), "--tokenizer", str(tokenizer_path),
                                 "--output-prefix", str(prefix), "--json-key", "content",
                                 "--workers", str(workers), "--no-progress"])
    assert code == 0
    _assert_dataset(prefix, _expected(tokenizer_path, texts))


def test_plain_text_per_file_and_per_line(tmp_path, tokenizer_path):
    files = [tmp_path / f"{i}.txt" for i in range(len(TEXTS))]
    for path, text in zip(files, TEXTS):
        path.write_text(text)
    args = ["--tokenizer", str(tokenizer_path), "--no-progress"]
    assert preprocess_data.main(["--input", *map(str, files), "--output-prefix",
                                 str(tmp_path / "files"), *args]) == 0
    _assert_dataset(tmp_path / "files", _expected(tokenizer_path, TEXTS))
    assert preprocess_data.main(["--input", str(files[0]), "--output-prefix",
                                 str(tmp_path / "lines"), "--text-docs", "line",
                                 "--no-append-eod", *args]) == 0
    lines = [line for line in TEXTS[0].splitlines() if line.strip()]
    _assert_dataset(tmp_path / "lines", _expected(tokenizer_path, lines, eod=False))


def _run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "preprocess_data.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, tokenizer_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    missing_key = tmp_path / "missing_key.jsonl"
    missing_key.write_text('{"text": "a"}\n{"body": "b"}\n')
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    not_utf8 = tmp_path / "latin1.txt"
    not_utf8.write_bytes("caf\u00e9\n".encode("latin-1"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "a"}\n{"text": \n')
    broken_tokenizer = tmp_path / "broken.json"
    broken_tokenizer.write_text('{"model": ')
    out = tmp_path / "out"
    cases = [
        ([good], tmp_path / "nope.json", "tokenizer file not found"),
        ([good], broken_tokenizer, "is not a valid tokenizer.json"),
        ([empty], tokenizer_path, f"input file {empty} is empty"),
        ([tmp_path / "absent.txt"], tokenizer_path, "input file not found"),
        ([good, missing_key], tokenizer_path, f"{missing_key}:2: no key 'text'"),
        ([bad_json], tokenizer_path, f"{bad_json}:2: invalid JSON"),
        ([not_utf8], tokenizer_path, f"{not_utf8}: not valid UTF-8"),
    ]
    for inputs, tokenizer, message in cases:
        code = preprocess_data.main(["--input", *map(str, inputs), "--tokenizer", str(tokenizer),
                                     "--output-prefix", str(out / "data"), "--workers", "2",
                                     "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [f"error: {err[0][7:]}"] and message in err[0], (message, err)
        assert not out.exists() or list(out.iterdir()) == []
    # The real entry point: exit status and stderr as a user sees them.
    result = _run_cli("--input", str(missing_key), "--tokenizer", str(tokenizer_path),
                      "--output-prefix", str(out / "data"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {missing_key}:2: no key 'text' in this JSON line"
    assert list(out.iterdir()) == []


def test_existing_prefix_is_kept_unless_forced(tmp_path, tokenizer_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text(TEXTS[0])
    prefix = tmp_path / "out" / "data"
    args = ["--input", str(text), "--tokenizer", str(tokenizer_path), "--output-prefix",
            str(prefix), "--no-progress"]
    assert preprocess_data.main(args) == 0
    before = {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")}
    text.write_text(TEXTS[2])
    capsys.readouterr()
    assert preprocess_data.main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {prefix}.bin exists (pass --force to replace the dataset)"]
    assert {s: Path(f"{prefix}{s}").read_bytes() for s in (".bin", ".idx")} == before
    assert preprocess_data.main([*args, "--force"]) == 0
    _assert_dataset(prefix, _expected(tokenizer_path, [TEXTS[2]]))
    assert sorted(p.name for p in prefix.parent.iterdir()) == ["data.bin", "data.idx"]
