"""Bad inputs a user or a cluster produces every day: one line, the right exit code, nothing lost.

Each case runs the real entry point in-process (WORLD_SIZE=1, as `python launch/...` would) and
checks the exit code, the one line on stderr, and that no process group was created where the
problem can be seen before one exists. The fault injections that need real processes (a hung rank,
a full disk, signals, two runs at once) are in tests/test_faults.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from distill.run import main
from engine.data import DataError, TokenBatches, write_indexed
from engine.data import dataset as dataset_module
from engine.data.config import DataConfig
from tests.trainer_utils import VOCAB, base_config, read_metrics, write_config

DOCS = 40  # documents of 30 tokens: a 90,10 split gives 4 validation documents


def _tokens(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, size=30) for _ in range(DOCS)]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("inputs")
    prefix = tmp / "good"
    write_indexed(prefix, _tokens(), np.uint16)
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["data"]["path"] = str(prefix)
    cfg["distill"] = {"logit": {"weight": 0}}
    return {"config": write_config(tmp / "run.yaml", cfg), "prefix": prefix, "tmp": tmp}


def run_main(config: Path, *overrides: str) -> int:
    return main(["--config", str(config), *overrides], distill=False)


def one_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines, "nothing on stderr"
    return lines[-1]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")


def _copy(good: dict, tmp_path: Path) -> tuple[Path, Path]:
    prefix = tmp_path / "data"
    for suffix in (".bin", ".idx"):
        Path(f"{prefix}{suffix}").write_bytes(Path(f"{good['prefix']}{suffix}").read_bytes())
    return Path(f"{prefix}.bin"), Path(f"{prefix}.idx")


def _shift_pointer(idx: Path) -> None:
    """Move sequence 1's pointer by one token: same sizes, wrong tokens."""
    raw = bytearray(idx.read_bytes())
    pointer_1 = 34 + 4 * DOCS + 8
    value = struct.unpack_from("<q", raw, pointer_1)[0]
    struct.pack_into("<q", raw, pointer_1, value + 2)
    idx.write_bytes(bytes(raw))


def _empty(bin_path: Path, idx: Path) -> None:
    bin_path.write_bytes(b"")
    idx.write_bytes(struct.pack("<9sQBQQ", b"MMIDIDX\x00\x00", 1, 8, 0, 1) + struct.pack("<q", 0))


DATA_CASES = {  # corruption -> start of the message after "ConfigError: data.path: "
    "truncated .bin": (lambda b, i: b.write_bytes(b.read_bytes()[:-6]), "truncated or mismatched"),
    "bad magic": (lambda b, i: i.write_bytes(b"NOTANIDX!" + i.read_bytes()[9:]), "bad magic"),
    "pointers": (lambda b, i: _shift_pointer(i), "sequence 1 starts at byte 62, but the lengths"),
    "empty": (_empty, "indexes no documents: the dataset is empty"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_corrupt_dataset_is_one_line_before_the_process_group(good, tmp_path, capsys, case):
    bin_path, idx = _copy(good, tmp_path)
    corrupt, message = DATA_CASES[case]
    corrupt(bin_path, idx)
    assert run_main(good["config"], f"data.path={tmp_path / 'data'}") == 2
    line = one_line(capsys)
    assert line.startswith("ConfigError: data.path: ") and message in line, line
    assert not dist.is_initialized()


def test_token_ids_past_the_vocabulary_are_one_line(good, tmp_path, capsys):
    docs = _tokens()
    docs[7][3] = VOCAB + 80
    write_indexed(tmp_path / "big_ids", docs, np.uint16)
    assert run_main(good["config"], f"data.path={tmp_path / 'big_ids'}") == 2
    assert one_line(capsys) == (f"ConfigError: data.path: {tmp_path / 'big_ids'}: token id "
                                f"{VOCAB + 80} in document 7 is outside the vocabulary "
                                f"[0, {VOCAB}) of model.vocab_size")


def test_token_ids_of_a_large_dataset_are_checked_as_they_are_read(good, tmp_path, monkeypatch):
    docs = _tokens()
    docs[7][3] = VOCAB + 80
    write_indexed(tmp_path / "big_ids", docs, np.uint16)
    monkeypatch.setattr(dataset_module, "EAGER_SCAN_BYTES", 0)  # "too large to scan"
    cfg = DataConfig(path=str(tmp_path / "big_ids"), seq_len=16, micro_batch=4, global_batch=4)
    dataset_module.check_datasets(cfg, vocab_size=VOCAB)  # passes: nothing scanned
    batches = TokenBatches(cfg, seed=0, vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"big_ids: token id 400 in document 7 is outside"):
        for _ in range(20):
            batches.next_step()


def test_validation_split_shorter_than_a_window_stops_at_start(good, tmp_path, capsys):
    docs = [np.arange(1, 200) % VOCAB for _ in range(9)] + [np.arange(1, 6)]
    write_indexed(tmp_path / "small_valid", docs, np.uint16)
    assert run_main(good["config"], f"data.path={tmp_path / 'small_valid'}") == 2
    assert one_line(capsys) == (
        f"ConfigError: data.seq_len: the valid split of {tmp_path / 'small_valid'} has 5 tokens, "
        "fewer than data.seq_len + 1 = 17 (data.split=100,0 trains without validation)")
    assert not dist.is_initialized()


def test_no_validation_split_trains_saves_and_skips_validation(good, tmp_path, caplog):
    run_dir = tmp_path / "run"
    assert run_main(good["config"], "data.split=100,0", f"train.run_dir={run_dir}") == 0
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert not any("val_loss" in r for r in records)
    assert (run_dir / "checkpoints" / "step_00000003" / "metadata.json").is_file()
    assert "leaves no validation data: validation is skipped" in caplog.text


def test_the_final_checkpoint_is_written_before_the_final_validation(good, tmp_path, monkeypatch):
    from distill.trainer import DistillTrainer

    def failing_validation(self):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(DistillTrainer, "validate", failing_validation)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="validation broke"):
        run_main(good["config"], f"train.run_dir={run_dir}")
    assert (run_dir / "checkpoints" / "step_00000003" / "metadata.json").is_file()
