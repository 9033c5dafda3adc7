"""tools/score.py: per-token log-probabilities at TP 2 under torchrun, and at TP 1 x DP 2, equal
transformers' log-probabilities on the same tokens (atol 1e-4, fp32); validation perplexity equals
transformers' mean loss over the same validation windows at every layout; bad inputs fail with one
`ConfigError:` line and exit 2, writing nothing."""

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from distill.evaluate import validation_loss
from engine.data import DataConfig, TokenBatches, write_indexed
from engine.parallel import ParallelConfig, make_layout
from engine.spawn import run_ranks
from tests.helpers import command, run_ok
from tools import convert_hf, score

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 80
TOL = dict(rtol=0, atol=1e-4)
SEQ_LEN, BATCHES, BATCH_SIZE, SEED = 12, 2, 4, 7


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF model dir, engine checkpoint imported at TP 1, token ids .npy, indexed-data prefix)."""
    root = tmp_path_factory.mktemp("score")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # O(1) logits: log-probs far from uniform
        for param in model.parameters():
            param.add_(torch.randn_like(param), alpha=0.15)
    model.save_pretrained(root / "hf")
    assert convert_hf.main(["import", "--hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    rng = np.random.default_rng(0)
    np.save(root / "tokens.npy", rng.integers(0, VOCAB, (3, 10)))  # 3 rows: uneven over DP 2
    documents = [rng.integers(0, VOCAB, int(n)) for n in rng.integers(5, 40, 12)]
    write_indexed(root / "data", documents, np.uint16)
    return root / "hf", root / "ckpt", root / "tokens.npy", str(root / "data")


def reference_log_probs(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = convert_hf.load_reference(hf_dir)
    with torch.no_grad():
        log_probs = model(ids).logits.log_softmax(-1)  # [batch, seq, vocab]
    return log_probs[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].float()  # as score.py writes


def data_config(prefix: str, dp: int = 1) -> DataConfig:
    return DataConfig(path=prefix, seq_len=SEQ_LEN, micro_batch=BATCH_SIZE // dp,
                      global_batch=BATCH_SIZE, split="50,50")


def reference_validation_loss(hf_dir: Path, prefix: str) -> float:
    """transformers' mean next-token loss over the windows the engine's validation stream draws."""
    stream = TokenBatches(data_config(prefix), seed=SEED, split="valid")
    batches = [mb for _ in range(BATCHES) for mb in stream.next_step()]
    ids, labels = (torch.cat([mb[key] for mb in batches]) for key in ("input_ids", "labels"))
    with torch.no_grad():
        logits = convert_hf.load_reference(hf_dir)(ids).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()


def score_args(ckpt: Path, prefix: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--data", prefix, "--seq-len", str(SEQ_LEN), "--batches",
            str(BATCHES), "--batch-size", str(BATCH_SIZE), "--split", "50,50", "--seed", str(SEED)]


@pytest.mark.slow  # a multi-rank end-to-end run
def test_torchrun_tp2_equals_transformers(setup, tmp_path):
    hf_dir, ckpt, tokens, _ = setup
    out = tmp_path / "logprobs.npy"
    run_ok(command("tools/score.py", "--ckpt", ckpt, "--tokens", tokens, "--out", out))
    got = np.load(out)
    ids = torch.from_numpy(np.load(tokens))
    assert got.dtype == np.float32 and got.shape == (3, 9)
    expected = reference_log_probs(hf_dir, ids)
    assert expected.std() > 0.5  # far from uniform: a wrong shard or shift would show
    torch.testing.assert_close(torch.from_numpy(got), expected, **TOL)


def _layouts(ckpt: str, ids: torch.Tensor, prefix: str) -> dict:
    """In 2 ranks: log-probs and validation loss at TP 1 x DP 2, at TP 2 x DP 1 and at PP 2."""
    step_dir, _, cfg = score.checkpoint_model_config(ckpt)
    results = {}
    for name, tp, pp in (("tp1", 1, 1), ("tp2", 2, 1), ("pp2", 1, 2)):
        model = score.load_model(step_dir, cfg, make_layout(ParallelConfig(tp=tp, pp=pp)))
        loss, tokens = validation_loss(model, data_config(prefix, dp=2 // (tp * pp)),
                                       micro_batches=BATCHES, seed=SEED)
        results[name] = (score.score_tokens(model, ids, micro_batch=2), loss, tokens)
    return results


def test_dp_tp_and_pp_layouts_equal_transformers(setup):
    hf_dir, ckpt, tokens, prefix = setup
    ids = torch.from_numpy(np.load(tokens))
    expected = reference_log_probs(hf_dir, ids)
    expected_loss = reference_validation_loss(hf_dir, prefix)
    for rank, results in enumerate(run_ranks(_layouts, 2, str(ckpt), ids, prefix, timeout_s=120)):
        for layout, (log_probs, loss, tokens) in results.items():
            where = f"rank {rank}, {layout}"
            torch.testing.assert_close(log_probs, expected, **TOL, msg=lambda m: f"{where}: {m}")
            assert tokens == BATCHES * BATCH_SIZE * SEQ_LEN, where
            assert loss == pytest.approx(expected_loss, abs=1e-4), where


def test_single_process_command_line(setup, tmp_path, capsys):
    hf_dir, ckpt, tokens, prefix = setup
    assert score.main(score_args(ckpt, prefix)) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["loss"] == pytest.approx(reference_validation_loss(hf_dir, prefix), abs=1e-4)
    assert line["perplexity"] == pytest.approx(math.exp(line["loss"]))
    assert line["tokens"] == BATCHES * BATCH_SIZE * SEQ_LEN

    narrow = tmp_path / "int32.npy"
    np.save(narrow, np.load(tokens).astype(np.int32))
    out = tmp_path / "nested" / "lp.npy"
    assert score.main(["--ckpt", str(ckpt), "--tokens", str(narrow), "--out", str(out)]) == 0
    expected = reference_log_probs(hf_dir, torch.from_numpy(np.load(tokens)))
    torch.testing.assert_close(torch.from_numpy(np.load(out)), expected, **TOL)
    assert sorted(p.name for p in out.parent.iterdir()) == ["lp.npy"]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 5), dtype=np.float32), "--tokens: .* must hold integer ids \\[batch, seq\\]"),
    (np.arange(6), "must hold integer ids"),
    (np.full((2, 5), VOCAB), f"--tokens: ids must be in \\[0, {VOCAB}\\)"),
    (np.zeros((1, 40), dtype=np.int64), "sequence length 40 must be between 2 and model.max_seq_len=32"),
    (np.zeros((0, 8), dtype=np.int64), "--tokens: .*bad.npy holds no rows \\(shape \\[0, 8\\]\\)"),
    (b"", "--tokens: .*bad.npy is not a readable .npy array"),
    ({"ids": np.zeros((2, 5), dtype=np.int64)},
     "--tokens: .*bad.npz is an .npz archive; save the one array of ids with numpy.save"),
])
def test_bad_tokens(setup, tmp_path, capsys, bad, message):
    _, ckpt, _, _ = setup
    path = tmp_path / ("bad.npz" if isinstance(bad, dict) else "bad.npy")
    if isinstance(bad, bytes):  # an empty file
        path.write_bytes(bad)
    elif isinstance(bad, dict):
        np.savez(path, **bad)
    else:
        np.save(path, bad)
    out = tmp_path / "out.npy"
    assert score.main(["--ckpt", str(ckpt), "--tokens", str(path), "--out", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if re.match(r"\w+Error: ", line)]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not out.exists()


def test_bad_arguments(setup, tmp_path, capsys):
    _, ckpt, tokens, prefix = setup
    existing = tmp_path / "old.npy"
    existing.write_bytes(b"keep")
    cases = [
        (["--ckpt", str(tmp_path / "none"), "--tokens", str(tokens), "--out", str(existing)],
         "--ckpt: no complete checkpoint at"),
        (["--ckpt", str(ckpt), "--tokens", str(tokens), "--out", str(existing)],
         "already exists (pass --force"),
        (["--ckpt", str(ckpt), "--tokens", str(tokens)], "--out: is required with --tokens"),
        (["--ckpt", str(ckpt), "--tokens", str(tmp_path / "none.npy"), "--out", "x.npy"],
         "--tokens: no such file"),
        ([*score_args(ckpt, prefix), "--seq-len", "64"], "--seq-len: 64 exceeds model.max_seq_len=32"),
        ([*score_args(ckpt, str(tmp_path / "nodata"))], "data.path: no indexed dataset at"),
        (["--ckpt", str(ckpt), "--data", prefix, "--tp", "3"], "parallel.tp=3 is larger than"),
        (["--ckpt", str(ckpt), "--data", prefix, "--pp", "2"], "--pp: parallel.tp=1 x parallel.pp=2"),
        (["--ckpt", str(ckpt), "--data", prefix, "--pp", "0"], "--pp: must be >= 1"),
    ]
    for argv, message in cases:
        assert score.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert existing.read_bytes() == b"keep"
