"""tools/generate.py: greedy ids equal transformers' greedy `generate` token for token on imported
tiny random Llama, Qwen2, GPT-2, Qwen3, Gemma 2/3, Phi-3 and SmolLM3 models (built from configs,
saved locally), single process and at TP=2 under torchrun; rows of a left-padded batch equal
transformers on each row alone; text prompts (a real byte-level BPE) and JSONL; the sequence-level
KD dataset (prompt + continuation, mask of generated tokens) is what greedy generation of
training-drawn prompts gives, an interrupted run resumes without redoing saved chunks and writes the
same dataset, and a student trains on it with the ordinary entry point; bad inputs fail with one
`ConfigError:` line and exit 2."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.weights import save_weights
from engine.checkpoint import resolve_checkpoint
from engine.data import DataConfig, IndexedTokens, TokenBatches, write_indexed
from engine.data.corpus import train_byte_level_bpe
from engine.parallel import ParallelLayout
from layers.decode import generate, left_pad
from tests.helpers import command, run, run_ok, subprocess_env
from tests.hf_models import FAMILIES, save_hf_model
from tests.trainer_utils import base_config, read_metrics, run_main, write_config
from tools import convert_hf, score
from tools import generate as generate_tool

ROOT = Path(__file__).resolve().parents[1]

VOCAB = 96
NEW = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{arch: (HF dir, engine checkpoint)} for Llama, Qwen2, GPT-2 and the families of
    tests/hf_models.py FAMILIES, and a prompts .npy."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for arch in ("llama", "qwen2", "gpt2", *FAMILIES):
        hf_dir = save_hf_model(arch, root / arch)
        assert convert_hf.main(["import", "--hf", str(hf_dir), "--out", str(root / f"{arch}.ckpt")]) == 0
        out[arch] = (hf_dir, root / f"{arch}.ckpt")
    np.save(root / "prompts.npy", np.random.default_rng(0).integers(0, VOCAB, (3, 5)))
    return out, root / "prompts.npy"


def hf_greedy(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = convert_hf.load_reference(hf_dir)
    model.generation_config.eos_token_id = None  # generate all NEW tokens, as the engine does
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", *FAMILIES])
def test_greedy_equals_transformers(models, arch, tmp_path):
    (hf_dir, ckpt), prompts = models[0][arch], models[1]
    out = tmp_path / "out.npy"
    assert generate_tool.main(["--ckpt", str(ckpt), "--tokens", str(prompts), "--out", str(out),
                               "--greedy", "--max-new-tokens", str(NEW), "--micro-batch", "2"]) == 0
    got = np.load(out)
    assert got.dtype == np.int64 and got.shape == (3, NEW)
    expected = hf_greedy(hf_dir, torch.from_numpy(np.load(prompts)))
    assert len(set(expected.flatten().tolist())) > 3  # not a degenerate repetition
    assert torch.equal(torch.from_numpy(got), expected)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text", "smollm3"])
def test_left_padded_batch_equals_transformers(models, arch):
    hf_dir, ckpt = models[0][arch]
    rows = [torch.from_numpy(r) for r in np.random.default_rng(1).integers(0, VOCAB, (3, 6))]
    rows = [rows[0], rows[1][:3], rows[2][:1]]
    ids, lengths = left_pad(rows)
    step_dir, _, cfg = score.checkpoint_model_config(ckpt)
    model = score.load_model(step_dir, cfg, ParallelLayout.single())
    got = generate(model, ids, prompt_lengths=lengths, max_new_tokens=NEW).tokens
    # Each row alone in transformers (its own left-padded generate turns padded rows into NaN).
    expected = torch.cat([hf_greedy(hf_dir, row[None]) for row in rows])
    assert torch.equal(got, expected)


@pytest.mark.slow  # a multi-rank end-to-end run
@pytest.mark.parametrize("arch,layout,reported", [
    ("qwen2", [], "tp=2, dp=1"), ("qwen2", ["--pp", "2"], "tp=1, pp=2, dp=1"),
    ("gemma3_text", ["--pp", "2"], "tp=1, pp=2, dp=1")], ids=["tp2", "pp2", "gemma3-pp2"])
def test_torchrun_tp2_and_pp2_equal_transformers(models, tmp_path, arch, layout, reported):
    (hf_dir, ckpt), prompts = models[0][arch], models[1]
    out = tmp_path / "out.npy"
    result = run_ok(command("tools/generate.py", "--ckpt", ckpt, "--tokens", prompts, "--out", out,
                            "--greedy", "--max-new-tokens", NEW, *layout))
    assert f"tokens/s ({reported})" in result.stderr
    expected = hf_greedy(hf_dir, torch.from_numpy(np.load(prompts)))
    assert torch.equal(torch.from_numpy(np.load(out)), expected)


# ------------------------------------------------------------------------------ text and seq-KD

TEXTS = ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
         "class Point:\n    x: int\n    y: int\n"] * 4


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """An engine checkpoint with a byte-level BPE tokenizer (imported from a tiny HF Llama) and an
    indexed dataset of that tokenizer's ids."""
    import transformers
    root = tmp_path_factory.mktemp("text")
    tokenizer = train_byte_level_bpe(TEXTS, 300)
    vocab = tokenizer.get_vocab_size()
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for param in hf.parameters():
            param.add_(torch.randn_like(param), alpha=0.15)
    hf.save_pretrained(root / "hf")
    tokenizer.save(str(root / "hf" / "tokenizer.json"))
    assert convert_hf.main(["import", "--hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    documents = [np.array(tokenizer.encode(t).ids + [0]) for t in TEXTS]
    write_indexed(root / "data", documents, np.uint16)
    return root / "ckpt", tokenizer, str(root / "data")


def test_text_and_jsonl_prompts(text_model, tmp_path, capsys):
    ckpt, tokenizer, _ = text_model
    prompts = ["def add(a", "import"]
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n\n")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"q": p}) + "\n" for p in prompts))
    common = ["--ckpt", str(ckpt), "--max-new-tokens", "6"]
    assert generate_tool.main([*common, "--prompts", str(tmp_path / "p.txt"),
                               "--out", str(tmp_path / "a.jsonl")]) == 0
    assert generate_tool.main([*common, "--prompts", str(tmp_path / "p.jsonl"), "--json-key", "q",
                               "--out", str(tmp_path / "b.jsonl")]) == 0
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()
    step_dir, _, cfg = score.checkpoint_model_config(ckpt)
    model = score.load_model(step_dir, cfg, ParallelLayout.single())
    for prompt, line in zip(prompts, lines):
        ids = torch.tensor([tokenizer.encode(prompt).ids])
        expected = generate(model, ids, max_new_tokens=6, eos_id=0).tokens[0].tolist()
        expected = expected[:expected.index(0)] if 0 in expected else expected
        assert line["prompt"] == prompt and line["ids"] == expected
        assert line["completion"] == tokenizer.decode(expected)
    assert generate_tool.main([*common, "--prompts", str(tmp_path / "p.txt"), "--seed", "3",
                               "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2


def seq_kd_args(ckpt, data, out, *extra):
    return ["--ckpt", str(ckpt), "--data", data, "--out", str(out), "--num-prompts", "5",
            "--prompt-len", "6", "--max-new-tokens", "5", "--micro-batch", "2", "--split", "100,0",
            "--seed", "9", *extra]


def _stop_after_chunk_0(monkeypatch) -> list:
    """Make the next `--data` run fail on saving chunk 1 (a full disk): a partial output."""
    saves = []
    real_save = generate_tool.SeqKDWriter.save

    def failing_save(self, chunk, *arrays):
        if chunk == 1 and "failed" not in saves:
            saves.append("failed")
            raise OSError("disk full (simulated)")
        saves.append(chunk)
        real_save(self, chunk, *arrays)

    monkeypatch.setattr(generate_tool.SeqKDWriter, "save", failing_save)
    return saves


def test_sequence_level_kd_dataset_and_resume(text_model, tmp_path, monkeypatch):
    ckpt, _, data = text_model
    out = tmp_path / "seqkd"
    saves = _stop_after_chunk_0(monkeypatch)
    assert generate_tool.main(seq_kd_args(ckpt, data, out)) == 2
    assert not Path(f"{out}.bin").exists() and saves == [0, "failed"]
    assert generate_tool.main(seq_kd_args(ckpt, data, out)) == 0
    assert saves == [0, "failed", 1, 2]  # chunk 0 was not redone
    assert not out.with_name("seqkd.partial").exists()

    docs, mask = IndexedTokens(out), IndexedTokens(f"{out}-generated")
    batches = TokenBatches(DataConfig(path=data, seq_len=6, micro_batch=2, global_batch=2,
                                      split="100,0"), seed=9, split="train")
    prompts = torch.cat([batches.next_step()[0]["input_ids"] for _ in range(3)])[:5]
    step_dir, _, cfg = score.checkpoint_model_config(ckpt)
    model = score.load_model(step_dir, cfg, ParallelLayout.single())
    assert len(docs) == len(mask) == 5
    for row in range(5):
        cont = generate(model, prompts[row:row + 1], max_new_tokens=5, eos_id=0).tokens[0].tolist()
        n = cont.index(0) + 1 if 0 in cont else 5
        expected = prompts[row].tolist() + cont[:n] + ([] if n < 5 or cont[-1] == 0 else [0])
        assert docs[row].tolist() == expected
        assert mask[row].tolist() == [0] * 6 + [1] * n + [0] * (len(expected) - 6 - n)

    again = tmp_path / "again"
    assert generate_tool.main(seq_kd_args(ckpt, data, again)) == 0
    assert Path(f"{again}.bin").read_bytes() == Path(f"{out}.bin").read_bytes()

    # The student trains on it with the ordinary entry point.
    run_cfg = base_config(tmp_path, cache=tmp_path / "cache")
    run_cfg["model"]["vocab_size"] = cfg.vocab_size
    run_cfg["data"].update(path=str(out), seq_len=8, split="100,0")
    run_cfg["train"]["steps"] = 2
    assert run_main(str(write_config(tmp_path / "student.yaml", run_cfg)), [], distill=False) == 0
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def _save_other_weights(ckpt_root: Path, step: int) -> Path:
    """Training moving on: a checkpoint of other weights at `step`, which `latest` names."""
    step_dir, run_config, cfg = score.checkpoint_model_config(ckpt_root)
    model = score.load_model(step_dir, cfg, ParallelLayout.single())
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(1.5)
    return save_weights(ckpt_root, model, ParallelLayout.single(), config=run_config, step=step)


def test_sequence_level_kd_resumes_only_with_the_same_weights(text_model, tmp_path, monkeypatch,
                                                              capsys):
    ckpt, _, data = text_model
    root = Path(shutil.copytree(ckpt, tmp_path / "ckpts"))
    first = resolve_checkpoint(root, key="--ckpt")
    out = tmp_path / "seqkd"
    argv = seq_kd_args(root, data, out, "--eos-id", "0")
    saves = _stop_after_chunk_0(monkeypatch)
    assert generate_tool.main(argv) == 2
    partial = sorted(p.name for p in out.with_name("seqkd.partial").iterdir())
    assert partial == ["chunk_000000.npz", "meta.json"]

    newer = _save_other_weights(root, 2)
    capsys.readouterr()
    assert generate_tool.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"ConfigError: --ckpt: {tmp_path / 'seqkd.partial'} holds chunks "
                              f"generated from {first} (step 0, weights sha256 "), err
    assert f"but --ckpt resolves to {newer} (step 2, weights sha256 " in err[-1]
    assert err[-1].endswith(f"finish it with --ckpt {first}, or remove {tmp_path / 'seqkd.partial'}")
    assert sorted(p.name for p in out.with_name("seqkd.partial").iterdir()) == partial
    assert saves == [0, "failed"]

    (root / "latest").write_text(first.name + "\n")  # the same weights again: resumes
    assert generate_tool.main(argv) == 0
    assert saves == [0, "failed", 1, 2]
    assert Path(f"{out}.bin").is_file()


@pytest.mark.slow  # torchrun
def test_rerun_with_other_arguments_is_one_line_on_every_rank(text_model, tmp_path, monkeypatch):
    """The resume check runs before any process group: every rank exits 2 on its own, none
    waits on a peer that has left (no gloo "Connection closed" traceback)."""
    ckpt, _, data = text_model
    out = tmp_path / "seqkd"
    _stop_after_chunk_0(monkeypatch)
    assert generate_tool.main(seq_kd_args(ckpt, data, out)) == 2
    argv = seq_kd_args(ckpt, data, out, "--seed", "10")
    line = (f"ConfigError: --out: {tmp_path / 'seqkd.partial'} holds chunks of a run with other "
            "arguments (remove it, or rerun with the same arguments)")
    done = run(command("tools/generate.py", *argv))  # the reproduction
    assert {text for text in done.stderr.splitlines() if text.startswith("ConfigError:")} == \
        {line}, done.stderr[-3000:]
    assert "exitcode  : 2" in done.stderr, done.stderr[-3000:]  # torchrun's report
    assert "Connection closed" not in done.stderr, done.stderr[-3000:]
    assert not re.search(rf'File "{ROOT}/(engine|layers|distill|tools|launch)/', done.stderr), \
        done.stderr[-3000:]  # no traceback through the project's code (torchrun prints its own)
    # Each rank alone, as torchrun starts it: it must end by itself (torchrun ends the others
    # once one has exited); one that created a process group would wait for its peer.
    launch = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    ranks = [run(command("tools/generate.py", *argv, nproc=0), timeout=120,
                 env=subprocess_env(RANK=str(rank), **launch)) for rank in (0, 1)]
    assert [r.returncode for r in ranks] == [2, 2]
    # rank 1 alone waits for rank 0's line (engine/entry.py), then, rank 0 being absent, says it
    assert [r.stderr.strip().splitlines() for r in ranks] == [[line], [f"rank 1: {line}"]]


def test_bad_arguments(models, text_model, tmp_path, capsys):
    (_, ckpt), prompts = models[0]["gpt2"], models[1]
    existing = tmp_path / "old.npy"
    existing.write_bytes(b"keep")
    base = ["--ckpt", str(ckpt), "--tokens", str(prompts)]
    cases = [
        ([*base, "--out", str(existing), "--max-new-tokens", "2"], "already exists (pass --force"),
        ([*base, "--max-new-tokens", "0"], "--max-new-tokens: must be >= 1"),
        ([*base, "--max-new-tokens", "40"], "prompt length 5 + 40 exceeds model.max_seq_len=40"),
        ([*base, "--max-new-tokens", "2", "--greedy", "--top-k", "3"], "--greedy: excludes"),
        ([*base, "--max-new-tokens", "2", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        ([*base, "--max-new-tokens", "2", "--temperature", "0"], "--temperature: must be > 0"),
        ([*base, "--max-new-tokens", "2", "--out", str(tmp_path / "x.txt")], "--out: must end in"),
        (["--ckpt", str(ckpt), "--prompts", str(prompts), "--max-new-tokens", "2"],
         "records no tokenizer"),
        ([*base, "--max-new-tokens", "2", "--eos-id", "500"], "--eos-id: must be in [0, 96)"),
        ([*base, "--max-new-tokens", "2", "--pp", "2"], "--pp: parallel.tp=1 x parallel.pp=2"),
        ([*base, "--max-new-tokens", "2", "--pp", "0"], "--pp: must be >= 1"),
        (["--ckpt", str(ckpt), "--prompts", str(tmp_path / "none.txt"), "--max-new-tokens", "2",
          "--tokenizer", str(tmp_path / "none.json")], "--tokenizer: no such file"),
    ]
    for argv, message in cases:
        assert generate_tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert existing.read_bytes() == b"keep"
    ckpt_text, _, data = text_model
    (tmp_path / "seqkd.partial").mkdir()
    (tmp_path / "seqkd.partial" / "meta.json").write_text("{}")
    assert generate_tool.main(seq_kd_args(ckpt_text, data, tmp_path / "seqkd")) == 2
    assert "holds chunks of a run with other arguments" in capsys.readouterr().err
