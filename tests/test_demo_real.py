"""`launch/demo.py --real --quick` end to end on a tiny random Llama GGUF written here (no download):
import, corpus in the teacher's tokenizer, pruning, one offline export, four students, scores,
continuations and the verified Hugging Face export; and the demo's arithmetic on its own."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml

from launch import demo_real
from tests.gguf_models import write_llama_gguf
from tests.helpers import command, run
from tests.trainer_utils import read_metrics

QUICK_LIMIT_S = 300  # the budget for --quick: 5 minutes
ROW = re.compile(r"^\| ([a-z-]+) \| ([\d.]+) M \| ([\d.]+) M \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|"
                 r" ([-\d.]*) \| (\d*) \|$", re.M)


def test_prune_targets_halve_smollm2_and_count_like_the_model():
    smollm2 = dict(layers=30, hidden=576, heads=9, kv_heads=3, head_dim=None, ffn_hidden=1536)
    targets = demo_real.prune_targets(smollm2, None, None)
    assert targets == {"layers": 20, "ffn_hidden": 1024}
    # 30 blocks of 884,736 attention + 2,654,208 MLP + 1,152 norm weights, and the final norm
    assert demo_real.non_embedding(smollm2) == 30 * (884_736 + 2_654_208 + 1_152) + 576
    student = {**smollm2, **targets}
    assert demo_real.non_embedding(student) / demo_real.non_embedding(smollm2) == pytest.approx(0.5, abs=0.01)
    assert demo_real.prune_targets(smollm2, 12, 512) == {"layers": 12, "ffn_hidden": 512}
    assert demo_real.prune_targets({**smollm2, "layers": 2, "ffn_hidden": 64}, None, None) == \
        {"layers": 1, "ffn_hidden": 40}


def test_gap_closed_is_the_share_of_the_baseline_gap():
    assert demo_real.gap_closed(4.0, baseline=6.0, teacher=2.0) == 0.5
    assert demo_real.gap_closed(6.0, baseline=6.0, teacher=2.0) == 0.0
    assert demo_real.gap_closed(2.0, baseline=6.0, teacher=2.0) == 1.0
    assert demo_real.gap_closed(7.0, baseline=6.0, teacher=2.0) == -0.25


def test_corpus_mixes_pydoc_topics_and_stdlib_files():
    docs = demo_real.documents(demo_real.QUICK)
    names = [name for name, _ in docs]
    for source, limit in (("pydoc:", demo_real.QUICK.topic_bytes), ("stdlib:", demo_real.QUICK.stdlib_bytes)):
        texts = [text for name, text in docs if name.startswith(source)]
        assert texts and limit / 2 < sum(map(len, texts)) <= limit
    assert len(set(names)) == len(names) and names != sorted(names)  # mixed, not pydoc first
    assert docs == demo_real.documents(demo_real.QUICK)  # a fixed order


def test_tokens_needed_is_the_first_step_at_the_twins_final_loss(tmp_path):
    for name, losses in (("pruned-distilled", [3.5, 3.1, 3.0]), ("pruned-ce", [3.6, 3.3, 3.1]),
                         ("random-distilled", [7.5, 7.4, 7.3]), ("random-ce", [7.4, 7.2, 7.1])):
        (tmp_path / name).mkdir()
        rows = [{"step": 1, "loss": 9.0}] + [{"step": 4 * (i + 1), "val_loss": v}
                                             for i, v in enumerate(losses)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert demo_real.steps_to_reach(demo_real.val_losses(tmp_path / "pruned-distilled"), 3.1) == 8
    lines = demo_real.catch_up(tmp_path, tokens_per_step=100)
    assert lines == [
        "- pruned-distilled reached pruned-ce's final in-training validation loss (3.1000) at step 8: "
        "800 tokens; pruned-ce needed 1200.",
        "- random-distilled reached random-ce's final in-training validation loss (7.1000) never; "
        "random-ce needed 1200."]


def _table(stdout: str) -> dict[str, tuple]:
    return {m[0]: tuple(m[1:]) for m in ROW.findall(stdout)}


@pytest.mark.slow
def test_quick_real_demo_on_a_tiny_gguf_teacher(tmp_path):
    gguf = write_llama_gguf(tmp_path / "teacher")
    out, cache = tmp_path / "demo", tmp_path / "cache"
    done = run(command("launch/demo.py", "--real", "--quick", "--gguf", gguf, "--out", out,
                       "--cache", cache, nproc=0), timeout=QUICK_LIMIT_S)
    table = _table(done.stdout)
    assert list(table) == ["teacher", *demo_real.STUDENTS], done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    for name, (params, _, loss, ppl, bpb, closed, speed) in table.items():
        row = rows[name]
        assert float(loss) == round(row["loss"], 4) and math.isfinite(row["loss"])
        assert float(params) == round(row["params"] / 1e6, 2)
        assert math.isclose(float(ppl), math.exp(row["loss"]), rel_tol=1e-3)
        assert float(bpb) > 0 and math.isclose(row["bpb"] / row["loss"], rows["teacher"]["bpb"]
                                               / rows["teacher"]["loss"], rel_tol=1e-9)
        assert (closed == "") == (speed == "") == (name == "teacher")
    assert rows["random-ce"]["gap_closed"] == 0.0
    best = min(demo_real.STUDENTS, key=lambda n: rows[n]["loss"])
    assert results["best"] == best and done.returncode == (0 if best == "pruned-distilled" else 1)

    # the students: one architecture (the pruning targets), the same data, seed and steps
    configs = {n: yaml.safe_load((out / n / "config.yaml").read_text()) for n in demo_real.STUDENTS}
    assert {(c["model"]["layers"], c["model"]["ffn_hidden"]) for c in configs.values()} == {(1, 40)}
    assert len({json.dumps(c["data"], sort_keys=True) for c in configs.values()}) == 1
    assert {(c["train"]["seed"], c["train"]["steps"]) for c in configs.values()} == \
        {(1234, demo_real.QUICK.steps)}
    assert [c["train"]["init"] for c in configs.values()] == [str(out / "pruned")] * 2 + [None] * 2
    assert [c["distill"]["schedule"] for c in configs.values()][::2] == ["offline"] * 2
    assert {configs[n]["distill"]["offline_dir"] for n in ("pruned-distilled", "random-distilled")} \
        == {str(out / "store")}
    for name, (_, distilled) in demo_real.STUDENTS.items():
        metrics = [m for m in read_metrics(out / name) if "kd_loss" in m]
        assert len(metrics) == demo_real.QUICK.steps
        assert all((m["kd_loss"] > 0) == distilled for m in metrics)
    store = json.loads((out / "store" / "metadata.json").read_text())
    assert store["k"] == demo_real.QUICK.top_k

    texts = results["continuations"]
    assert list(texts) == list(rows) and all(len(t) == len(demo_real.PROMPTS) for t in texts.values())
    report = (out / "report.md").read_text()
    assert report.startswith("| model |") and "## Greedy continuations" in report
    assert report.count("final in-training validation loss") == 2
    assert (out / "loss_curves.png").stat().st_size > 0
    hf_config = json.loads((out / "hf" / "config.json").read_text())
    assert hf_config["num_hidden_layers"] == 1 and (out / "hf" / "model.safetensors").is_file()

    # a second run reuses the teacher, corpus, pruned model, store and finished students: nothing
    # is imported, pruned, exported or trained again, and the same table comes out
    again = run(command("launch/demo.py", "--real", "--quick", "--gguf", gguf, "--out", out,
                        "--cache", cache, nproc=0), timeout=QUICK_LIMIT_S)
    assert again.returncode == done.returncode, again.stderr[-3000:]
    for tool in ("tools/convert_hf.py import", "tools/preprocess_data.py", "tools/prune.py",
                 "tools/export_teacher_logits.py", "launch/pretrain_distill.py", "launch/pretrain.py"):
        assert f"running: {tool}" in done.stderr and f"running: {tool}" not in again.stderr
    assert _table(again.stdout) == table

    # --variations: the two pruned students are reused; each variation trains from the pruned
    # model on a store of its own k and temperature (the T = 2 one) or the demo's
    varied = run(command("launch/demo.py", "--real", "--quick", "--variations", "--gguf", gguf,
                         "--out", out, "--cache", cache, nproc=0), timeout=QUICK_LIMIT_S)
    assert varied.returncode == 0, varied.stderr[-3000:]
    assert varied.stderr.count("running: launch/pretrain_distill.py") == len(demo_real.VARIATIONS)
    assert "running: launch/pretrain.py" not in varied.stderr
    result = json.loads((out / "variations.json").read_text())
    losses = result["losses"]
    assert list(losses) == ["teacher", "pruned-distilled", "pruned-ce", *demo_real.VARIATIONS]
    assert losses["pruned-distilled"] == rows["pruned-distilled"]["loss"]
    assert losses["teacher"] == rows["teacher"]["loss"]
    for name, (_, kd) in demo_real.VARIATIONS.items():
        cfg = yaml.safe_load((out / name / "config.yaml").read_text())
        assert cfg["train"]["init"] == str(out / "pruned") and cfg["train"]["steps"] == demo_real.QUICK.steps
        assert (cfg["distill"]["logit"]["kind"], cfg["distill"]["logit"]["temperature"],
                cfg["distill"]["lm_weight"], cfg["distill"]["logit"]["weight"]) == \
            (kd.kind, kd.temperature, kd.lm_weight, kd.kd_weight)
        store = json.loads((out / demo_real.store_name(demo_real.QUICK, kd) / "metadata.json").read_text())
        assert (store["k"], store["temperature"]) == (kd.top_k or demo_real.QUICK.top_k, kd.temperature)
        assert math.isfinite(losses[name])
    lines = (out / "variations.md").read_text().splitlines()
    assert len([line for line in lines if line.startswith("| ")]) == 1 + len(losses)  # header, rows
