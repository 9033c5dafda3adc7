"""Imported mixture-of-experts checkpoints at expert parallelism against transformers.

Random tiny Mixtral, Qwen2-MoE (gated shared expert) and Qwen3-MoE models (tests/hf_models.py) are
saved with `save_pretrained` and imported once with `tools/convert_hf.py import` (TP=1). On spawned
gloo ranks at EP=2 x TP=1 and EP=2 x TP=2 (the checkpoint resharded on load), each data-parallel
rank runs its own prompts, so the experts of one rank serve the other's tokens:
- float64 logits equal transformers' on the same prompts (the bound of tests/test_families.py:
  the fp32 norms);
- greedy decoding (layers/decode.py) equals transformers' greedy `generate` token for token, and
  with an end-of-sequence id that ends one rank's rows early the other rank still decodes to the
  end: a rank that stopped alone would leave the other waiting in its next all_to_all.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine.mappings import gather_from_tp
from engine.parallel import ParallelConfig, make_layout
from engine.spawn import run_ranks
from layers.decode import generate
from tests.hf_models import save_hf_model
from tools import convert_hf, score

MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
HF_TOL = dict(rtol=1e-5, atol=1e-5)
ROWS, PROMPT, NEW = 2, 6, 8  # per DP rank


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("moe-interop")
    out = {}
    for family in MOE_FAMILIES:
        hf_dir = save_hf_model(family, root / family)
        assert convert_hf.main(["import", "--hf", str(hf_dir), "--out", str(root / f"{family}.ckpt")]) == 0
        out[family] = (hf_dir, root / f"{family}.ckpt")
    return out


def _prompts(vocab: int) -> torch.Tensor:
    """[2 DP ranks x ROWS, PROMPT] prompt ids; rank d takes rows d*ROWS .. (d+1)*ROWS."""
    return torch.from_numpy(np.random.default_rng(2).integers(0, vocab, (2 * ROWS, PROMPT)))


def _reference(hf_dir: Path, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' float64 logits and greedy continuation (no end-of-sequence id) of `prompts`."""
    model = convert_hf.load_reference(hf_dir).double()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        logits = model(prompts).logits
        tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW,
                                do_sample=False, pad_token_id=0)[:, PROMPT:]
    return logits, tokens


def _rank(ckpt: Path, tp: int, prompts: torch.Tensor, eos_id: int) -> dict:
    layout = make_layout(ParallelConfig(tp=tp, ep=2))
    step_dir, _, cfg = score.checkpoint_model_config(ckpt)
    model = score.load_model(step_dir, cfg, layout, dtype=torch.float64)
    mine = prompts[layout.dp_rank * ROWS:(layout.dp_rank + 1) * ROWS]
    with torch.no_grad():
        logits = gather_from_tp(model(mine).logits, layout.tp_group)[..., :cfg.vocab_size]
    greedy = generate(model, mine, max_new_tokens=NEW).tokens
    stopped = generate(model, mine, max_new_tokens=NEW, eos_id=eos_id)
    return {"dp_rank": layout.dp_rank, "ep_rank": layout.ep_rank, "logits": logits,
            "greedy": greedy, "stopped": stopped.tokens, "lengths": stopped.lengths}


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_imported_moe_at_ep2_equals_transformers(imported, family, tp):
    hf_dir, ckpt = imported[family]
    _, _, cfg = score.checkpoint_model_config(ckpt)
    assert cfg.moe is not None and cfg.moe.experts % 2 == 0
    prompts = _prompts(cfg.vocab_size)
    logits, tokens = _reference(hf_dir, prompts)
    assert len(set(tokens.flatten().tolist())) > 3  # not a degenerate repetition
    # an end-of-sequence id that a row of rank 0 emits before its last step and rank 1's rows
    # never emit
    other = set(tokens[ROWS:].flatten().tolist())
    eos = next(int(t) for t in tokens[:ROWS, :NEW - 1].flatten() if int(t) not in other)
    per_rank = run_ranks(_rank, 2 * tp, ckpt, tp, prompts, eos, timeout_s=300)
    assert sorted({r["ep_rank"] for r in per_rank}) == [0, 1]
    for result in per_rank:
        rows = slice(result["dp_rank"] * ROWS, (result["dp_rank"] + 1) * ROWS)
        torch.testing.assert_close(result["logits"], logits[rows], **HF_TOL)
        assert torch.equal(result["greedy"], tokens[rows])
        for row, (got, want, length) in enumerate(zip(result["stopped"], tokens[rows],
                                                      result["lengths"])):
            ends = [i for i, t in enumerate(want.tolist()) if t == eos]
            expected = ends[0] + 1 if ends else NEW
            assert int(length) == expected, (result["dp_rank"], row)
            assert torch.equal(got[:expected], want[:expected])
            assert (got[expected:] == eos).all()
    assert (per_rank[0]["lengths"] < NEW).any() and (per_rank[-1]["lengths"] == NEW).all()
