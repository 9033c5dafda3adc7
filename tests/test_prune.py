"""tools/prune.py on a tiny random Llama imported from transformers (4 blocks, grouped-query heads,
tied embeddings): keeping everything gives bitwise the same logits; the importance scores equal a
float64 reference computed from transformers' float64 activations (read by hooks in this test);
the kept units are the best-scoring ones with grouped-query groups whole; TP=2 writes the same
checkpoint as TP=1; a pruned model loads with train.init, trains, exports to Hugging Face and passes
--verify, and so does a pruned Qwen3 (QK-norm, head_dim apart from hidden / heads); bad targets
are one line, exit 2, nothing written."""

import argparse
import json
import re

import numpy as np
import pytest
import torch
import transformers

from engine.config import to_dict
from engine.data.indexed import write_indexed
from engine.parallel import ParallelConfig, ParallelLayout, make_layout
from engine.spawn import run_ranks
from layers.sharding import full_state_dict
from tests.helpers import command, run_ok
from tests.hf_models import save_hf_model
from tests.trainer_utils import make_teacher, read_metrics, run_main, write_config
from tools import convert_hf, prune
from tools.score import checkpoint_model_config, load_model

VOCAB, SEQ = 96, 24
ERROR_LINE = re.compile(r"\w+Error: ")
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
             tie_word_embeddings=True)
SMALLER = dict(layers=3, hidden=24, ffn_hidden=48, heads=2, kv_heads=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(HF directory, imported checkpoint, calibration data prefix)."""
    root = tmp_path_factory.mktemp("prune")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=noise), alpha=0.15)
    model.save_pretrained(root / "hf")
    assert convert_hf.main(["import", "--hf", str(root / "hf"), "--out", str(root / "ckpt")]) == 0
    rng = np.random.default_rng(0)
    write_indexed(root / "calib", [rng.integers(0, VOCAB, 60) for _ in range(40)], np.uint16)
    return root / "hf", root / "ckpt", str(root / "calib")


def prune_args(ckpt, out, data, *, samples=8, **targets) -> argparse.Namespace:
    args = prune.parse_args(["--ckpt", str(ckpt), "--out", str(out), "--data", data,
                             "--calib-samples", str(samples), "--seq-len", str(SEQ),
                             "--micro-batch", "4"])
    args.__dict__.update(targets)
    return args


def run_prune(*args: object) -> int:
    return prune.main([str(a) for a in args])


def forward(ckpt, ids):
    step_dir, _, cfg = checkpoint_model_config(str(ckpt))
    with torch.no_grad():
        return load_model(step_dir, cfg, ParallelLayout.single())(ids)


def logits(ckpt, ids):
    return forward(ckpt, ids).logits


def full_weights(ckpt):
    step_dir, _, cfg = checkpoint_model_config(str(ckpt))
    return full_state_dict(load_model(step_dir, cfg, ParallelLayout.single()))


def test_keeping_everything_is_bitwise_the_same_model(setup, tmp_path):
    hf_dir, ckpt, data = setup
    common = ["--ckpt", ckpt, "--data", data, "--calib-samples", 4, "--seq-len", SEQ]
    assert run_prune(*common, "--out", tmp_path / "same") == 0
    assert run_prune(*common, "--out", tmp_path / "full", "--layers", 4, "--hidden", 32,
                     "--heads", 4, "--kv-heads", 2, "--ffn-hidden", 64) == 0
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for out in ("same", "full"):
        assert torch.equal(logits(tmp_path / out, ids), logits(ckpt, ids))
        assert (tmp_path / out / "importance.json").is_file()
    assert checkpoint_model_config(str(tmp_path / "same"))[2] == checkpoint_model_config(str(ckpt))[2]


def test_mtp_heads_biases_and_untied_head_are_sliced(setup, tmp_path):
    """An engine model with every optional tensor (biases, an untied output layer, an MTP head):
    keeping everything is bitwise the same; a pruned one is a working model of the new shape."""
    hf_dir, ckpt, data = setup
    model = dict(vocab_size=VOCAB, hidden=32, layers=3, heads=4, kv_heads=2, ffn_hidden=64,
                 max_seq_len=48, bias=True, mtp_heads=1, init_std=0.2)
    source = make_teacher(tmp_path / "src", {"model": model})
    common = ["--ckpt", source, "--data", data, "--calib-samples", 4, "--seq-len", SEQ]
    assert run_prune(*common, "--out", tmp_path / "same") == 0
    assert run_prune(*common, "--out", tmp_path / "small", "--hidden", 16, "--heads", 2,
                     "--ffn-hidden", 8, "--layers", 2) == 0
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
    want, same, small = (forward(path, ids) for path in (source, tmp_path / "same", tmp_path / "small"))
    small_cfg = checkpoint_model_config(str(tmp_path / "small"))[2]
    assert torch.equal(same.logits, want.logits) and torch.equal(same.mtp_logits[0], want.mtp_logits[0])
    assert (small_cfg.hidden, small_cfg.heads, small_cfg.num_kv_heads, small_cfg.mtp_heads) == (16, 2, 2, 1)
    assert small.logits.isfinite().all() and len(small.mtp_logits) == 1
    kept = json.loads((tmp_path / "small" / "importance.json").read_text())["kept"]
    assert set(kept["heads"]) == {"decoder.0", "decoder.1", "decoder.2", "mtp.1"}


def _hf_reference(hf_dir, batches) -> dict:
    """The importance definitions, computed from transformers' float64 activations."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager")
    model = model.double().eval()
    layers, seen = model.model.layers, {"in": [], "out": [], "ctx": [], "inner": [], "norm": []}
    hooks = [model.model.norm.register_forward_hook(lambda m, a, o: seen["norm"].append(o))]
    for layer in layers:
        hooks += [layer.register_forward_pre_hook(lambda m, a: seen["in"].append(a[0])),
                  layer.register_forward_hook(lambda m, a, o: seen["out"].append(
                      o[0] if isinstance(o, tuple) else o)),
                  layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen["ctx"].append(a[0])),
                  layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen["inner"].append(a[0])),
                  layer.input_layernorm.register_forward_hook(lambda m, a, o: seen["norm"].append(o)),
                  layer.post_attention_layernorm.register_forward_hook(
                      lambda m, a, o: seen["norm"].append(o))]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for hook in hooks:
        hook.remove()
    n = len(layers)
    per = {key: [torch.cat(seen[key][i::n]) for i in range(n)] for key in ("in", "out", "ctx", "inner")}
    flat = lambda x: x.reshape(-1, x.shape[-1])  # noqa: E731  [tokens, features]
    heads = [flat(c).view(-1, 4, 8).norm(dim=-1).mean(0) for c in per["ctx"]]
    assert len(seen["norm"]) == (2 * n + 1) * len(batches)
    return {"blocks": torch.stack([(1 - torch.cosine_similarity(flat(a), flat(b), dim=-1)).mean()
                                   for a, b in zip(per["in"], per["out"])]),
            "heads": heads, "neurons": [flat(x).abs().mean(0) for x in per["inner"]],
            # every norm sees every token: the sum over norms of each one's token mean
            "channels": sum(flat(x).abs().sum(0) for x in seen["norm"]) / sum(map(torch.numel, batches))}


def test_importance_equals_a_float64_reference(setup, tmp_path):
    """Both in float64; transformers computes its RMSNorm in fp32 even then, so the scores agree
    to fp32 round-off (relative 1e-6), not to float64's."""
    hf_dir, ckpt, data = setup
    step_dir, _, cfg = checkpoint_model_config(str(ckpt))
    batches = prune.calibration_batches(prune_args(ckpt, tmp_path / "x", data, samples=8), cfg)
    assert len(batches) == 2 and batches[0].shape == (4, SEQ)
    model = load_model(step_dir, cfg, ParallelLayout.single(), dtype=torch.float64)
    got, want = prune.importance(model, batches), _hf_reference(hf_dir, batches)
    assert got.tokens == 8 * SEQ
    close = dict(rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(got.blocks, want["blocks"], **close)
    torch.testing.assert_close(got.channels, want["channels"], **close)
    for i in range(cfg.layers):
        torch.testing.assert_close(got.heads[f"decoder.{i}"], want["heads"][i], **close)
        torch.testing.assert_close(got.neurons[f"decoder.{i}"], want["neurons"][i], **close)


def test_choose_keeps_the_best_units_and_whole_groups():
    cfg = prune.ModelConfig(hidden=8, layers=4, heads=6, kv_heads=2, ffn_hidden=4, vocab_size=16,
                            head_dim=4)
    scores = prune.Importance(
        blocks=torch.tensor([0.3, 0.1, 0.5, 0.2], dtype=torch.float64),
        channels=torch.arange(8, dtype=torch.float64).flip(0),
        heads={"decoder.0": torch.tensor([1.0, 0.1, 0.2, 0.9, 0.8, 5.0], dtype=torch.float64)},
        neurons={"decoder.0": torch.tensor([0.4, 0.3, 0.9, 0.1], dtype=torch.float64)})
    new = prune.pruned_config(cfg, dict(layers=2, hidden=3, ffn_hidden=2, heads=2, kv_heads=1))
    assert (new.heads, new.num_kv_heads, new.head_dim) == (2, 1, 4)
    kept = prune.choose(scores, cfg, new)
    assert kept.layers.tolist() == [0, 2] and kept.channels.tolist() == [0, 1, 2]
    # group 1 (heads 3-5: 6.7) beats group 0 (heads 0-2: 1.3), though head 0 beats heads 3 and 4
    assert kept.kv_heads["decoder.0"].tolist() == [1]
    assert kept.heads["decoder.0"].tolist() == [3, 5]
    assert kept.neurons["decoder.0"].tolist() == [0, 2]
    # --kv-heads alone keeps the group size; --heads alone keeps the groups
    assert prune.pruned_config(cfg, dict.fromkeys(prune.TARGETS) | {"kv_heads": 1}).heads == 3
    assert prune.pruned_config(cfg, dict.fromkeys(prune.TARGETS) | {"heads": 4}).num_kv_heads == 2


def _prune_on_ranks(args: argparse.Namespace) -> None:
    prune.prune(args, make_layout(ParallelConfig(tp=2)))


def test_tp2_prune_writes_the_tp1_checkpoint(setup, tmp_path):
    hf_dir, ckpt, data = setup
    targets = [f"--{key.replace('_', '-')}={value}" for key, value in SMALLER.items()]
    assert run_prune("--ckpt", ckpt, "--data", data, "--calib-samples", 8, "--seq-len", SEQ,
                     "--out", tmp_path / "tp1", *targets) == 0
    run_ranks(_prune_on_ranks, 2, prune_args(ckpt, tmp_path / "tp2", data, **SMALLER), timeout_s=120)
    meta = json.loads((tmp_path / "tp2" / "step_00000000" / "metadata.json").read_text())
    assert meta["layout"]["tp"] == 2
    one, two = full_weights(tmp_path / "tp1"), full_weights(tmp_path / "tp2")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    details = [json.loads((tmp_path / d / "importance.json").read_text()) for d in ("tp1", "tp2")]
    assert details[0]["kept"] == details[1]["kept"]
    np.testing.assert_allclose(details[1]["importance"]["channels"],
                               details[0]["importance"]["channels"], rtol=1e-5)
    cfg = checkpoint_model_config(str(tmp_path / "tp2"))[2]
    assert (cfg.layers, cfg.hidden, cfg.ffn_hidden, cfg.heads, cfg.num_kv_heads, cfg.dim_per_head) \
        == (3, 24, 48, 2, 2, 8)


def test_pruned_tensors_are_the_kept_slices(setup, tmp_path):
    """Each pruned tensor, spelled out by hand from importance.json's kept indices."""
    hf_dir, ckpt, data = setup
    targets = [f"--{key.replace('_', '-')}={value}" for key, value in SMALLER.items()]
    assert run_prune("--ckpt", ckpt, "--data", data, "--calib-samples", 8, "--seq-len", SEQ,
                     "--out", tmp_path / "out", *targets) == 0
    kept = json.loads((tmp_path / "out" / "importance.json").read_text())["kept"]
    src, got = full_weights(ckpt), full_weights(tmp_path / "out")
    ch = torch.tensor(kept["channels"])
    assert len(kept["layers"]) == 3 and len(ch) == 24
    assert torch.equal(got["embedding.weight"], src["embedding.weight"][:, ch])
    assert torch.equal(got["final_norm.weight"], src["final_norm.weight"][ch])
    for new, old in enumerate(kept["layers"]):
        block = f"decoder.{old}"
        heads, kv, neurons = (torch.tensor(kept[k][block]) for k in ("heads", "kv_heads", "neurons"))
        assert all(h // 2 in kv.tolist() for h in heads.tolist())  # groups of 2 stay together
        q_rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in heads.tolist()])
        kv_rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in kv.tolist()])
        ours = lambda name: got[f"decoder.{new}.{name}"]  # noqa: E731
        theirs = lambda name: src[f"{block}.{name}"]  # noqa: E731
        assert torch.equal(ours("attn_norm.weight"), theirs("attn_norm.weight")[ch])
        assert torch.equal(ours("attention.q_proj.weight"), theirs("attention.q_proj.weight")[q_rows][:, ch])
        assert torch.equal(ours("attention.k_proj.weight"), theirs("attention.k_proj.weight")[kv_rows][:, ch])
        assert torch.equal(ours("attention.v_proj.weight"), theirs("attention.v_proj.weight")[kv_rows][:, ch])
        assert torch.equal(ours("attention.o_proj.weight"), theirs("attention.o_proj.weight")[ch][:, q_rows])
        assert torch.equal(ours("mlp.gate_proj.weight"), theirs("mlp.gate_proj.weight")[neurons][:, ch])
        assert torch.equal(ours("mlp.down_proj.weight"), theirs("mlp.down_proj.weight")[ch][:, neurons])
    scores = json.loads((tmp_path / "out" / "importance.json").read_text())["importance"]["blocks"]
    dropped = sorted(set(range(4)) - set(kept["layers"]))
    assert scores[dropped[0]] == min(scores)  # the block that changes the stream least goes


@pytest.mark.slow  # torchrun, two ranks
def test_torchrun_tp2_command_line(setup, tmp_path):
    hf_dir, ckpt, data = setup
    common = ["--ckpt", ckpt, "--data", data, "--calib-samples", 8, "--seq-len", SEQ, "--layers", 3,
              "--ffn-hidden", 32]
    run_ok(command("tools/prune.py", *common, "--out", tmp_path / "tp2"))
    assert run_prune(*common, "--out", tmp_path / "tp1") == 0
    one, two = full_weights(tmp_path / "tp1"), full_weights(tmp_path / "tp2")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tp1", "tp2"]


@pytest.mark.slow  # an end-to-end training run and an export with --verify
def test_pruned_llama_trains_exports_and_verifies(setup, tmp_path):
    hf_dir, ckpt, data = setup
    out = tmp_path / "pruned"
    assert run_prune("--ckpt", ckpt, "--data", data, "--calib-samples", 8, "--seq-len", SEQ,
                     "--out", out, "--layers", 2, "--hidden", 24, "--heads", 2, "--kv-heads", 1,
                     "--ffn-hidden", 40) == 0
    cfg = checkpoint_model_config(str(out))[2]
    run = {"model": to_dict(cfg), "parallel": {"tp": 1, "timeout_s": 60},
           "data": {"path": data, "seq_len": 16, "micro_batch": 2, "global_batch": 4, "split": "90,10"},
           "train": {"steps": 3, "lr": 1e-3, "warmup_steps": 0, "decay": "constant",
                     "run_dir": str(tmp_path / "run"), "eval_batches": 1, "progress": False,
                     "init": str(out), "save_interval": 3}}
    assert run_main(str(write_config(tmp_path / "run.yaml", run)), [], distill=False) == 0
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics if "loss" in m][-1] == 3
    # train.init took the pruned weights: 3 Adam steps of lr 1e-3 move each by a few 1e-3 at most
    # (the weights are O(0.15); a fresh initialization would be another model entirely)
    pruned, trained = full_weights(out), full_weights(tmp_path / "run" / "checkpoints")
    assert set(pruned) == set(trained)
    assert max((trained[k] - pruned[k]).abs().max().item() for k in pruned) < 1e-2
    exported = tmp_path / "hf"
    assert convert_hf.main(["export", "--ckpt", str(tmp_path / "run" / "checkpoints"), "--out",
                            str(exported), "--verify"]) == 0
    config = json.loads((exported / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (2, 24, 1)


@pytest.mark.parametrize("flags, message", [
    (["--layers", 5], "ConfigError: --layers: must be between 1 and the model's layers=4 (got 5)"),
    (["--heads", 3], "--heads: 3 query heads do not form 2 grouped-query groups"),
    (["--heads", 4, "--kv-heads", 1], "--heads: 4 query heads do not form 1 grouped-query groups "
                                      "of the model's groups of 2"),
    (["--kv-heads", 3], "--kv-heads: must be between 1 and the model's kv_heads=2 (got 3)"),
    (["--hidden", 0], "--hidden: must be between 1"),
    (["--calib-samples", 6], "--calib-samples: must be a multiple of --micro-batch=4 (got 6)"),
    (["--seq-len", 64], "--seq-len: 64 exceeds model.max_seq_len=48"),
])
def test_bad_targets_are_one_line_and_write_nothing(setup, tmp_path, capsys, flags, message):
    hf_dir, ckpt, data = setup
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--data", data, "--out", out, "--calib-samples", 8, "--seq-len", SEQ]
    assert run_prune(*args, *flags) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pruned_qwen3_exports_and_verifies(tmp_path):
    """QK-norm and a head width independent of hidden / heads (Qwen3): pruning heads and width keeps
    each kept head's q/k norm and its head_dim, and the result is a Qwen3 transformers runs."""
    hf_dir = save_hf_model("qwen3", tmp_path / "hf")
    assert convert_hf.main(["import", "--hf", str(hf_dir), "--out", str(tmp_path / "ckpt")]) == 0
    rng = np.random.default_rng(0)
    write_indexed(tmp_path / "calib", [rng.integers(0, VOCAB, 60) for _ in range(40)], np.uint16)
    out = tmp_path / "pruned"
    assert run_prune("--ckpt", tmp_path / "ckpt", "--data", tmp_path / "calib", "--calib-samples", 8,
                     "--seq-len", SEQ, "--out", out, "--layers", 1, "--hidden", 24, "--heads", 2,
                     "--kv-heads", 1, "--ffn-hidden", 40) == 0
    cfg = checkpoint_model_config(str(out))[2]
    assert (cfg.layers, cfg.hidden, cfg.heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.qk_norm) == \
        (1, 24, 2, 1, 16, True)
    exported = tmp_path / "exported"
    assert convert_hf.main(["export", "--ckpt", str(out), "--out", str(exported), "--verify"]) == 0
    assert json.loads((exported / "config.json").read_text())["model_type"] == "qwen3"
