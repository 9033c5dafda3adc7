"""Mixture-of-experts blocks (layers/moe.py) against float64 references.

- One MoE block, single process: outputs, routing, the auxiliary losses and every gradient equal a
  token-by-token float64 reference written from the definitions (1e-12).
- A two-block MoE model (shared expert with its gate, an expert no token chooses) at EP 2/4 x
  TP 1/2 (+SP) on spawned gloo ranks, each DP rank on its own micro-batch: logits, router logits
  and, after the reductions the optimizer makes (dense gradients summed over DP, expert gradients
  over the expert-DP group), every gradient equal the single-process model run on the same
  micro-batches one after the other (1e-12, float64).
- Through the entry point, 3 steps: an MoE student distilled from a dense teacher at EP=2 x DP=2,
  EP=2 x TP=2 + SP and EP=2 x PP=2 equals the single-process run (the run tolerances), and the
  EP=2 checkpoint resumes at EP=1 to the same next step; with the distributed optimizer at EP=2 x
  DP=4 the same, its checkpoint resuming at EP=2 and EP=1; an MoE teacher on teacher ranks at
  teacher_ep=2 feeding a dense TP=2 + SP student equals the colocated single-process run.
- Under context parallelism (EP groups cut from the DP x CP ranks): the model at CP=2/4 x EP 1/2/4
  (x TP=2, +SP, etp) equals the single-process model (logits, router logits, auxiliary losses,
  every gradient, 1e-12), and an MoE student at CP=2 x EP=2/4 the single-process run.
- On-policy: an MoE student decoding its own samples at EP=2 x DP=2 equals the single process.
- Bad layouts and configs are one-line ConfigErrors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.activation import activation_pair_means
from distill.config import ResolvedPair
from distill.runconfig import load_run_config
from engine import collectives as C
from engine.config import ConfigError
from engine.mappings import gather_from_tp
from engine.parallel import LayoutError, ParallelConfig, ParallelLayout, make_layout, validate_layout
from engine.param_tags import param_tags
from engine.spawn import run_ranks
from layers.buffers import ActivationBuffer
from layers.config import ModelConfig, MoEConfig
from layers.context import cp_positions
from layers.model import TransformerLM
from layers.moe import MoE
from layers.sharding import gather_full
from tests.helpers import RUN_KEYS, assert_same_run
from tests.trainer_utils import base_config, make_teacher, read_metrics, run_in, teacher_config, write_config

TOL = dict(rtol=1e-12, atol=1e-12)
MOE = MoEConfig(experts=8, top_k=2, expert_ffn_hidden=8, shared_experts=1, shared_expert_ffn_hidden=12,
                shared_expert_gate=True, aux_loss_coef=0.1, z_loss_coef=0.01)
CONFIG = ModelConfig(vocab_size=64, hidden=16, layers=2, heads=4, kv_heads=2, ffn_hidden=32,
                     max_seq_len=16, moe=MOE)
NEVER_CHOSEN = 7  # see _model: no token reaches this expert
BATCH, SEQ = 2, 8


def _reference(x, router, experts, moe: MoEConfig):
    """Token by token, from the definitions: (output [N, H], logits, chosen, aux, z)."""
    logits = x @ router.T
    probs = torch.softmax(logits, dim=-1)
    scores, chosen = torch.topk(probs, moe.top_k, dim=-1)
    scores = scores / scores.sum(-1, keepdim=True) if moe.norm_topk_prob else scores
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(moe.top_k):
            gate, up, down = experts[int(chosen[t, j])]
            out[t] += scores[t, j] * (down @ (F.silu(gate @ x[t]) * (up @ x[t])))
    counts = torch.bincount(chosen.flatten(), minlength=moe.experts).double()
    aux = moe.experts * (counts / x.shape[0] * probs.mean(0)).sum()
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    return out, logits, chosen, aux, z


def test_block_equals_the_token_by_token_reference():
    moe_cfg = dataclasses.replace(MOE, shared_experts=0, shared_expert_gate=False)
    config = dataclasses.replace(CONFIG, moe=moe_cfg)
    torch.manual_seed(0)
    block = MoE(config, ParallelLayout.single()).double()
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.5)
    x = torch.randn(1, 10, 16, dtype=torch.float64, requires_grad=True)
    out, logits = block(x)
    losses = {k: v.item() for k, v in block.last_losses.items()}
    weights = {e: (exp.gate_proj.weight, exp.up_proj.weight, exp.down_proj.weight)
               for e, exp in ((int(k), v) for k, v in block.experts.items())}
    x_ref = x.detach().clone().requires_grad_()
    ref, ref_logits, chosen, aux, z = _reference(x_ref[0], block.router.weight, weights, moe_cfg)
    torch.testing.assert_close(out[0], ref, **TOL)
    torch.testing.assert_close(logits[0], ref_logits, **TOL)
    assert len(set(chosen.flatten().tolist())) > 1  # the tokens really go to several experts
    assert losses["moe_aux_loss"] == pytest.approx(aux.item(), rel=1e-12)
    assert losses["moe_z_loss"] == pytest.approx(z.item(), rel=1e-12)
    # The weighted auxiliary loss reaches the router through attach_loss in the backward.
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    got = {name: p.grad.clone() for name, p in block.named_parameters()}
    got["x"] = x.grad.clone()
    block.zero_grad()
    total = (ref * upstream[0]).sum() + moe_cfg.aux_loss_coef * aux + moe_cfg.z_loss_coef * z
    total.backward()
    want = {name: p.grad for name, p in block.named_parameters()}
    want["x"] = x_ref.grad
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, **TOL, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- parallel layouts

def _model(layout: ParallelLayout) -> TransformerLM:
    """Router rows 1, 3, 5 mirror rows 0, 2, 4 and row 7 is zero: of the logits (a, -a, b, -b, c,
    -c, d, 0) three are positive, so expert 7 (logit 0) is never in a token's top two."""
    model = TransformerLM(CONFIG, layout, seed=5).double()
    with torch.no_grad():
        for block in model.decoder.values():
            rows = block.mlp.router.weight
            rows[1::2][:3] = -rows[0::2][:3]
            rows[NEVER_CHOSEN] = 0.0
    return model


def _batches(dp: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(0, 64, (BATCH, SEQ), generator=g),
             torch.randn(BATCH, SEQ, 64, generator=g, dtype=torch.float64)) for _ in range(dp)]


def _step(model: TransformerLM, ids: torch.Tensor, weights: torch.Tensor, group,
          positions: torch.Tensor | None = None) -> dict:
    """One forward and backward; with `positions`, this CP rank's chunks of the sequences. Also
    each block's unweighted auxiliary losses."""
    names = [f"decoder.{i}.router_logits" for i in range(CONFIG.layers)]
    if positions is not None:
        ids, weights = ids[:, positions], weights[:, positions]
    out = model(ids, buffers=names, positions=positions, cp_chunks=positions is not None)
    logits = gather_from_tp(out.logits, group)[..., :64]
    (logits * weights).sum().backward()
    routers = {n: b.tensor.detach() for n, b in out.buffers.items()}
    if model.layout.sp:
        routers = {n: C.all_gather(t, group, dim=1) for n, t in routers.items()}
    losses = {f"{i}.{k}": v.item() for i, block in model.decoder.items()
              for k, v in block.mlp.last_losses.items()}
    return {"logits": logits.detach(), "routers": routers, "losses": losses}


def _reference_run(dp: int) -> dict:
    model = _model(ParallelLayout.single())
    results = [_step(model, ids, w, None) for ids, w in _batches(dp)]
    return {"steps": results, "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def _run_layout(tp: int, sp: bool, ep: int, etp: int = 1) -> dict:
    layout = make_layout(ParallelConfig(tp=tp, sp=sp, ep=ep, etp=etp))
    model = _model(layout)
    ids, weights = _batches(layout.dp)[layout.dp_rank]
    result = _step(model, ids, weights, layout.tp_group)
    grads = {}
    for name, param in model.named_parameters():  # the optimizer's reductions, then whole tensors
        expert = param_tags(param).expert
        grad = C.all_reduce(param.grad.clone(), layout.expert_dp_group if expert else layout.dp_group)
        grads[name] = gather_full(param, layout=layout, vocab_size=64, tensor=grad)
    result["grads"] = grads
    result["dp_rank"] = layout.dp_rank
    result["ffn_here"] = {p.shape[0] for n, p in model.named_parameters() if n.endswith("up_proj.weight")
                          and ".experts." in n}
    return result


@pytest.mark.parametrize("tp,sp,ep,etp", [(1, False, 2, 1), (1, False, 4, 1), (2, False, 2, 1),
                                         (2, True, 2, 1), (2, True, 2, 2), (2, False, 1, 2)])
def test_expert_parallel_layouts_equal_the_single_process_run(tp, sp, ep, etp):
    world = 4
    per_rank = run_ranks(_run_layout, world, tp, sp, ep, etp, timeout_s=300)
    ref = _reference_run(world // tp)
    experts: dict[str, torch.Tensor] = {}
    for rank, result in enumerate(per_rank):
        assert result["ffn_here"] == {MOE.expert_ffn_hidden // etp}  # each expert split over etp
        want = ref["steps"][result["dp_rank"]]
        torch.testing.assert_close(result["logits"], want["logits"], **TOL)
        for name, tensor in want["routers"].items():
            torch.testing.assert_close(result["routers"][name], tensor, **TOL, msg=name)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], **TOL,
                                       msg=lambda m: f"rank {rank} grad of {name}: {m}")
            if ".experts." in name:
                experts[name] = grad
    # Together the ranks hold every expert, and the one no token chose has a zero gradient.
    assert set(experts) == {n for n in ref["grads"] if ".experts." in n}
    assert experts[f"decoder.0.mlp.experts.{NEVER_CHOSEN}.up_proj.weight"].abs().max() == 0
    assert all(experts[f"decoder.0.mlp.experts.{e}.up_proj.weight"].abs().max() > 0
               for e in range(NEVER_CHOSEN))


def _run_cp_layout(tp: int, sp: bool, cp: int, ep: int, etp: int) -> dict:
    layout = make_layout(ParallelConfig(tp=tp, sp=sp, cp=cp, ep=ep, etp=etp))
    model = _model(layout)
    ids, weights = _batches(layout.dp)[layout.dp_rank]
    positions = cp_positions(SEQ, cp, layout.cp_rank)
    result = _step(model, ids, weights, layout.tp_group, positions)
    grads = {}
    for name, param in model.named_parameters():  # the trainer's reductions, then whole tensors
        group = layout.expert_dp_group if param_tags(param).expert else layout.dp_cp_group
        grads[name] = gather_full(param, layout=layout, vocab_size=64,
                                  tensor=C.all_reduce(param.grad.clone(), group))
    experts = sorted(int(n.split(".")[4]) for n, _ in model.named_parameters()
                     if n.startswith("decoder.0.mlp.experts.") and n.endswith("up_proj.weight"))
    return {**result, "grads": grads, "dp_rank": layout.dp_rank, "positions": positions,
            "ep_rank": layout.ep_rank, "experts": experts}


CP_ROWS = [  # (tp, sp, cp, ep, etp) on 4 ranks
    (1, False, 2, 2, 1),  # DP=2: each EP group is the two CP ranks of a sequence
    (1, False, 2, 4, 1),  # EP over DP x CP
    (1, False, 4, 4, 1),  # EP over the CP ranks of one sequence
    (2, True, 2, 2, 1), (2, False, 2, 1, 1), (2, True, 2, 2, 2)]


@pytest.mark.parametrize("tp,sp,cp,ep,etp", CP_ROWS)
def test_context_parallel_expert_layouts_equal_the_single_process_run(tp, sp, cp, ep, etp):
    """Each DP rank's micro-batch split over CP (chunks r and 2cp-1-r), EP groups cut from the DP x
    CP ranks: logits, router logits, the auxiliary losses (statistics summed over CP: the CP=1
    values) and, after the reductions (dense over DP x CP, experts over the expert-DP group), every
    gradient equal the single-process model on the whole micro-batches (1e-12, float64)."""
    world = 4
    per_rank = run_ranks(_run_cp_layout, world, tp, sp, cp, ep, etp, timeout_s=300)
    ref = _reference_run(world // (tp * cp))
    for rank, result in enumerate(per_rank):
        first = result["ep_rank"] * (MOE.experts // ep)
        assert result["experts"] == list(range(first, first + MOE.experts // ep))
        want, cols = ref["steps"][result["dp_rank"]], result["positions"]
        torch.testing.assert_close(result["logits"], want["logits"][:, cols], **TOL)
        for name, tensor in want["routers"].items():
            torch.testing.assert_close(result["routers"][name], tensor[:, cols], **TOL, msg=name)
        assert result["losses"].keys() == want["losses"].keys()
        for name, value in want["losses"].items():
            assert result["losses"][name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], **TOL,
                                       msg=lambda m: f"rank {rank} grad of {name}: {m}")


def test_bad_layouts_and_configs_are_one_line_errors():
    with pytest.raises(LayoutError, match="parallel.ep=3 does not divide the data-parallel degree 4"):
        validate_layout(ParallelConfig(ep=3), 4)
    with pytest.raises(LayoutError, match="parallel.ep=8 does not divide the data-parallel degree 2 "
                                          r"x parallel.cp=2 \(experts are split over DP x CP ranks\)"):
        validate_layout(ParallelConfig(cp=2, ep=8), 4)
    validate_layout(ParallelConfig(cp=2, ep=4), 4)  # EP=4 inside DP=2 x CP=2
    with pytest.raises(ConfigError, match="model.moe.experts: 8 experts do not split over parallel.ep=3"):
        TransformerLM(CONFIG, dataclasses.replace(ParallelLayout.single(), ep=3))
    with pytest.raises(ConfigError, match="model.moe.top_k: must be <= model.moe.experts=4"):
        MoEConfig(experts=4, top_k=5)
    with pytest.raises(ConfigError, match="model.moe_layers: must be block indices below 2"):
        dataclasses.replace(CONFIG, moe_layers=(2,))


# ------------------------------------------------------------------- through the entry point

def _moe_run_config(tmp: Path) -> Path:
    """A dense teacher distilled into an MoE student (every block: 4 experts, top 2, a shared
    expert; both auxiliary losses on)."""
    cfg = base_config(tmp, cache=tmp / "cache")
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher_config(cfg))),
                      "lm_weight": 0.5, "logit": {"weight": 1.0, "temperature": 2.0}}
    cfg["model"]["moe"] = {"experts": 4, "top_k": 2, "expert_ffn_hidden": 32, "shared_experts": 1,
                           "aux_loss_coef": 0.05, "z_loss_coef": 0.001}
    return write_config(tmp / "run.yaml", cfg)


MOE_KEYS = ("loss", "lm_loss", "kd_loss", "grad_norm", "moe_aux_loss", "moe_z_loss")


@pytest.mark.slow  # multi-rank end-to-end runs
def test_moe_student_at_ep2_dp2_and_pp2_equals_the_single_process_run(tmp_path):
    path = _moe_run_config(tmp_path)
    assert run_in(path, tmp_path / "ep1", []) == 0
    want = read_metrics(tmp_path / "ep1")
    assert want[0]["moe_aux_loss"] > 0.5 and want[0]["kd_loss"] > 0
    layouts = {"ep2_dp2": ["parallel.ep=2"], "ep2_dp2_tp2_sp": ["parallel.ep=2", "parallel.tp=2",
                                                                  "parallel.sp=true"],
               "ep2_pp2": ["parallel.ep=2", "parallel.pp=2"]}
    worlds = {"ep2_dp2": 2, "ep2_dp2_tp2_sp": 4, "ep2_pp2": 4}
    for name, overrides in layouts.items():
        assert run_ranks(run_in, worlds[name], path, tmp_path / name, overrides,
                         timeout_s=300) == [0] * worlds[name], name
        assert_same_run(read_metrics(tmp_path / name), want, keys=MOE_KEYS)
    # The EP=2 checkpoint (experts in one file per EP rank) loads at EP=1 and continues exactly.
    assert run_in(path, tmp_path / "ep2_dp2", ["train.steps=4"]) == 0
    assert run_in(path, tmp_path / "ep1", ["train.steps=4"]) == 0
    assert_same_run(read_metrics(tmp_path / "ep2_dp2")[-1:], read_metrics(tmp_path / "ep1")[-1:],
                    keys=MOE_KEYS)


@pytest.mark.slow  # multi-rank end-to-end runs
def test_distributed_optimizer_at_ep2_dp4_equals_the_single_process_run(tmp_path):
    """Expert buckets sliced over the expert-DP group (2 of the 4 DP ranks), dense ones over DP;
    its EP=2 checkpoint resumes at EP=2 (sharded) and at EP=1 (replicated) to the same step."""
    path = _moe_run_config(tmp_path)
    common = ["data.micro_batch=1"]  # 4 DP ranks of one sample each
    assert run_in(path, tmp_path / "ep1", common) == 0
    sharded = [*common, "parallel.ep=2", "train.distributed_optimizer=true"]
    assert run_ranks(run_in, 4, path, tmp_path / "ep2", sharded, timeout_s=300) == [0] * 4
    assert_same_run(read_metrics(tmp_path / "ep2"), read_metrics(tmp_path / "ep1"), keys=MOE_KEYS)
    ckpt = tmp_path / "ep2" / "checkpoints" / "step_00000003"
    assert run_in(path, tmp_path / "ep1", [*common, "train.steps=4"]) == 0
    want = read_metrics(tmp_path / "ep1")[-1:]
    assert run_in(path, tmp_path / "at_ep1", [*common, "train.steps=4", f"train.resume={ckpt}"]) == 0
    assert_same_run(read_metrics(tmp_path / "at_ep1")[-1:], want, keys=MOE_KEYS)
    assert run_ranks(run_in, 4, path, tmp_path / "ep2", [*sharded, "train.steps=4"],
                     timeout_s=300) == [0] * 4
    assert_same_run(read_metrics(tmp_path / "ep2")[-1:], want, keys=MOE_KEYS)


@pytest.mark.slow  # multi-rank end-to-end runs
def test_moe_student_under_context_parallelism_equals_the_single_process_run(tmp_path):
    """EP groups inside DP x CP: CP=2 x EP=2 (the EP group is the CP pair of a sequence), CP=2 x
    DP=2 x EP=2 with DDP and EP=4 with the distributed optimizer (over DP and CP) equal the CP=1
    single-process run, auxiliary losses included; the CP=2 x EP=2 checkpoint resumes at one
    process, and the distributed optimizer's at its own layout, to the same next step."""
    path = _moe_run_config(tmp_path)
    assert run_in(path, tmp_path / "single", []) == 0
    want = read_metrics(tmp_path / "single")
    layouts = {"cp2_ep2": (2, ["parallel.cp=2", "parallel.ep=2"]),
               "cp2_dp2_ep2": (4, ["parallel.cp=2", "parallel.ep=2"]),
               "cp2_dp2_ep4_distributed_optimizer": (4, ["parallel.cp=2", "parallel.ep=4",
                                                         "train.distributed_optimizer=true"])}
    for name, (world, overrides) in layouts.items():
        assert run_ranks(run_in, world, path, tmp_path / name, overrides, timeout_s=300) == \
            [0] * world, name
        assert_same_run(read_metrics(tmp_path / name), want, keys=MOE_KEYS)
    ckpt = tmp_path / "cp2_ep2" / "checkpoints" / "step_00000003"
    assert run_in(path, tmp_path / "single", ["train.steps=4"]) == 0
    assert run_in(path, tmp_path / "resumed", ["train.steps=4", f"train.resume={ckpt}"]) == 0
    want = read_metrics(tmp_path / "single")[-1:]
    assert_same_run(read_metrics(tmp_path / "resumed")[-1:], want, keys=MOE_KEYS)
    name = "cp2_dp2_ep4_distributed_optimizer"
    world, overrides = layouts[name]
    assert run_ranks(run_in, world, path, tmp_path / name, [*overrides, "train.steps=4"],
                     timeout_s=300) == [0] * world
    got = read_metrics(tmp_path / name)
    assert [r["step"] for r in got] == [1, 2, 3, 4]  # resumed after step 3, not run again
    assert_same_run(got[-1:], want, keys=MOE_KEYS)


@pytest.mark.slow  # a multi-rank end-to-end run
def test_on_policy_moe_student_at_ep2_equals_the_single_process_run(tmp_path):
    """Every micro-batch's tail written by the MoE student (layers/decode.py through the EP=2
    blocks, the two DP ranks decoding their own rows and stopping together) and scored by the
    colocated teacher. A nucleus of one token makes the samples the argmax: which micro-batches are
    on-policy (fraction 1) and what they hold do not depend on the DP rank's seed, so EP=2 x DP=2
    equals the single process, which runs both micro-batches."""
    path = _moe_run_config(tmp_path)
    on_policy = ["distill.on_policy={fraction: 1.0, max_new_tokens: 6, top_p: 1.0e-6}"]
    assert run_in(path, tmp_path / "ep1", on_policy) == 0
    want = read_metrics(tmp_path / "ep1")
    assert all(r["kd_loss"] > 0 for r in want)
    assert run_ranks(run_in, 2, path, tmp_path / "ep2", [*on_policy, "parallel.ep=2"],
                     timeout_s=300) == [0, 0]
    assert_same_run(read_metrics(tmp_path / "ep2"), want, keys=MOE_KEYS)


@pytest.mark.slow  # multi-rank end-to-end runs
def test_experts_split_over_tp_equal_the_single_process_run(tmp_path):
    """parallel.etp=2: each expert's inner width split over TP=2 (+SP) at EP=2 x DP=2; its
    checkpoint (expert slices per TP rank, experts per EP rank) resumes at one process, and the
    single process's resumes at etp=2, to the same next step."""
    path = _moe_run_config(tmp_path)
    assert run_in(path, tmp_path / "single", []) == 0
    overrides = ["parallel.tp=2", "parallel.sp=true", "parallel.ep=2", "parallel.etp=2"]
    assert run_ranks(run_in, 4, path, tmp_path / "etp2", overrides, timeout_s=300) == [0] * 4
    assert_same_run(read_metrics(tmp_path / "etp2"), read_metrics(tmp_path / "single"), keys=MOE_KEYS)
    ckpt = tmp_path / "etp2" / "checkpoints" / "step_00000003"
    single = tmp_path / "single" / "checkpoints" / "step_00000003"
    assert run_in(path, tmp_path / "resumed", ["train.steps=4", f"train.resume={ckpt}"]) == 0
    assert run_ranks(run_in, 4, path, tmp_path / "resumed_etp2", [*overrides, "train.steps=4",
                                                                   f"train.resume={single}"],
                     timeout_s=300) == [0] * 4
    assert run_in(path, tmp_path / "single", ["train.steps=4"]) == 0
    for resumed in ("resumed", "resumed_etp2"):  # the experts joined, and cut again
        assert_same_run(read_metrics(tmp_path / resumed)[-1:],
                        read_metrics(tmp_path / "single")[-1:], keys=MOE_KEYS)


def test_etp_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"parallel.etp: must be 1 or parallel.tp=2 \(got 3\)"):
        ParallelConfig(tp=2, etp=3)
    with pytest.raises(ConfigError, match="model.moe.expert_ffn_hidden: 8 does not split over "
                                          "parallel.etp=3"):
        TransformerLM(CONFIG, dataclasses.replace(ParallelLayout.single(), etp=3))
    path = _moe_run_config(tmp_path)
    with pytest.raises(ConfigError, match="parallel.etp: parallel.etp=2 needs parallel.sp or "
                                          "data.seq_len=15 divisible by parallel.tp=2"):
        load_run_config(path, ["parallel.tp=2", "parallel.etp=2", "data.seq_len=15"], world_size=2)
    with pytest.raises(ConfigError, match="parallel.etp: parallel.etp=2 needs a mixture-of-experts "
                                          "student"):
        load_run_config(path, ["parallel.tp=2", "parallel.etp=2", "model.moe=null"], world_size=2)


TEACHER_MOE = {"experts": 4, "top_k": 2, "expert_ffn_hidden": 48, "shared_experts": 1}


def _moe_teacher_config(tmp: Path) -> Path:
    """A dense student distilled from an MoE teacher (3 blocks of 4 experts, top 2, a shared
    expert) with logits and an activation pair."""
    cfg = base_config(tmp, cache=tmp / "cache")
    teacher = teacher_config(cfg)
    teacher["model"]["moe"] = TEACHER_MOE
    cfg["distill"] = {"teacher": str(make_teacher(tmp / "teacher", teacher)), "lm_weight": 0.5,
                      "logit": {"weight": 1.0, "temperature": 2.0},
                      "activations": [{"student": "decoder.1.mlp_output",
                                       "teacher": "decoder.2.mlp_output"}],
                      "projection": "per_pair"}
    return write_config(tmp / "run.yaml", cfg)


TEACHER_RANKS_EP2 = ["distill.schedule=teacher_ranks", "parallel.teacher_ranks=2",
                     "parallel.teacher_tp=1", "parallel.teacher_ep=2"]


@pytest.mark.slow  # a 6-rank end-to-end run
def test_moe_teacher_on_teacher_ranks_at_ep2_equals_the_colocated_run(tmp_path):
    """The MoE teacher on 2 teacher ranks at teacher_ep=2 (its experts split over its 2 DP ranks,
    tokens exchanged between them) streams final hidden states and an MLP buffer to a dense
    TP=2 + SP student at DP=2: the same run as the teacher colocated in one process."""
    path = _moe_teacher_config(tmp_path)
    assert run_in(path, tmp_path / "colocated", []) == 0
    overrides = ["parallel.tp=2", "parallel.sp=true", *TEACHER_RANKS_EP2]
    assert run_ranks(run_in, 6, path, tmp_path / "remote", overrides, timeout_s=300) == [0] * 6
    want = read_metrics(tmp_path / "colocated")
    assert want[0]["kd_loss"] > 0 and want[0]["act_loss"] > 0
    assert_same_run(read_metrics(tmp_path / "remote"), want, keys=(*RUN_KEYS, "act_loss"))


def _teacher_ep_coords() -> tuple:
    layout = make_layout(ParallelConfig(tp=2, sp=True, teacher_ranks=2, teacher_tp=1, teacher_ep=2))
    return layout.role, layout.ep, layout.ep_rank, layout.dp_rank, C.group_size(layout.ep_group)


@pytest.mark.slow  # 6 spawned ranks
def test_teacher_ep_groups_are_inside_the_teacher_dp():
    coords = run_ranks(_teacher_ep_coords, 6, timeout_s=120)
    assert coords[:4] == [("student", 1, 0, d, 1) for d in (0, 0, 1, 1)]  # TP=2 x DP=2, no EP
    assert coords[4:] == [("teacher", 2, 0, 0, 2), ("teacher", 2, 1, 1, 2)]


def test_teacher_ep_layout_errors_are_one_line(tmp_path):
    with pytest.raises(LayoutError, match="parallel.teacher_ep=2 does not divide the teacher's "
                                          "data-parallel degree 1"):
        validate_layout(ParallelConfig(teacher_ranks=2, teacher_tp=2, teacher_ep=2), 4)
    with pytest.raises(ConfigError, match="parallel.teacher_ep: only applies with "
                                          "parallel.teacher_ranks > 0"):
        ParallelConfig(teacher_ep=2)
    path = _moe_teacher_config(tmp_path)
    layout = ["distill.schedule=teacher_ranks", "parallel.teacher_ranks=3", "parallel.teacher_tp=1",
              "parallel.teacher_ep=3", "data.global_batch=6"]
    with pytest.raises(ConfigError, match="parallel.teacher_ep: the teacher's 4 experts do not "
                                          "split over parallel.teacher_ep=3") as err:
        load_run_config(path, layout, world_size=6)
    assert "\n" not in str(err.value)
    dense = _moe_run_config(tmp_path / "dense_teacher")  # an MoE student, a dense teacher
    with pytest.raises(ConfigError, match="parallel.teacher_ep: parallel.teacher_ep=2 needs a "
                                          "mixture-of-experts teacher"):
        load_run_config(dense, [*TEACHER_RANKS_EP2[:3], "parallel.teacher_ep=2"], world_size=4)


# ----------------------------------------------------------------- the router activation pair

ROUTER_PAIR = ResolvedPair("decoder.0.router_logits", "decoder.1.router_logits", "router", 1.0)


def test_router_pair_is_the_kl_of_the_router_distributions():
    """KL(p_t || p_s) per token from the definition in float64, over the counted tokens; its
    gradient with respect to the student's router logits is (p_s - p_t) / tokens."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = 3 * torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 5, generator=g) > 0.3
    tokens = int(mask.sum())
    value = activation_pair_means([ROUTER_PAIR], {ROUTER_PAIR.student: ActivationBuffer(student, False)},
                                  {ROUTER_PAIR.teacher: ActivationBuffer(teacher, False)},
                                  token_mask=mask, num_tokens=tokens)
    p_t = teacher.exp() / teacher.exp().sum(-1, keepdim=True)
    p_s = student.detach().exp() / student.detach().exp().sum(-1, keepdim=True)
    kl = (p_t * (p_t / p_s).log()).sum(-1)  # [batch, seq]
    torch.testing.assert_close(value, (kl[mask].sum() / tokens).reshape(1), **TOL)
    value.sum().backward()
    torch.testing.assert_close(student.grad, torch.where(mask[..., None], p_s - p_t, 0) / tokens,
                               **TOL)


def _router_pair_config(tmp: Path) -> Path:
    """An MoE student (4 experts) distilled from an MoE teacher (4 experts): logits and the
    router distributions of student block 1 against teacher block 2."""
    path = _moe_run_config(tmp)
    cfg = yaml.safe_load(path.read_text())
    teacher = teacher_config(base_config(tmp, cache=tmp / "cache"))
    teacher["model"]["moe"] = TEACHER_MOE
    cfg["distill"].update(teacher=str(make_teacher(tmp / "moe_teacher", teacher)), activations=[
        {"student": "decoder.1.router_logits", "teacher": "decoder.2.router_logits",
         "loss": "router", "weight": 2.0}])
    return write_config(path, cfg)


@pytest.mark.slow  # multi-rank end-to-end runs
def test_router_pair_at_ep2_and_tp2_equals_the_single_process_run(tmp_path):
    path = _router_pair_config(tmp_path)
    assert run_in(path, tmp_path / "single", []) == 0
    want = read_metrics(tmp_path / "single")
    assert want[0]["act_loss"] > 0.01
    layouts = {"ep2_dp2": (2, ["parallel.ep=2"]),
               "ep2_dp2_tp2_sp": (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"])}
    for name, (world, overrides) in layouts.items():
        assert run_ranks(run_in, world, path, tmp_path / name, overrides,
                         timeout_s=300) == [0] * world, name
        assert_same_run(read_metrics(tmp_path / name), want, keys=(*MOE_KEYS, "act_loss"))


def test_router_pair_errors_are_one_line(tmp_path):
    path = _router_pair_config(tmp_path)
    with pytest.raises(ConfigError, match=r"distill.activations\[0\].loss: router needs the same "
                                          r"expert count \(student 8, teacher 4\)"):
        load_run_config(path, ["model.moe.experts=8"], world_size=1)
    wrong = "distill.activations=[{student: decoder.1.mlp_output, teacher: decoder.2.router_logits, " \
            "loss: router}]"
    with pytest.raises(ConfigError, match=r"distill.activations\[0\].loss: router compares router "
                                          "distributions: the student buffer must be a "
                                          r"decoder.\{i\}.router_logits"):
        load_run_config(path, [wrong], world_size=1)
    dense = "distill.activations=[{student: decoder.1.router_logits, " \
            "teacher: decoder.2.router_logits, loss: router}]"
    with pytest.raises(ConfigError, match=r"distill.activations\[0\].student: student buffer "
                                          r"'decoder.1.router_logits': block 1 of the student is "
                                          "not a mixture of experts"):
        load_run_config(path, [dense, "model.moe=null"], world_size=1)


def test_moe_benchmark_runs_and_counts_the_all_to_all(capsys):
    from tools.bench import moe as bench

    bench.main(["--hidden", "32", "--experts", "4", "--top-k", "2", "--expert-ffn", "16",
                "--tokens", "64", "--steps", "1", "--threads", "1"])
    printed = capsys.readouterr().out
    assert float(printed.split("max |output diff| ")[1].split()[0]) < 1e-5  # the same weights
    assert "| megadistill MoE (EP=1) |" in printed
    forward = next(line for line in printed.splitlines() if line.startswith("| forward |"))
    counted, analytic = (float(cell) for cell in forward.split("|")[2:4])
    # the token rows exactly, plus the per-expert counts (4 int64 per rank and block)
    assert analytic <= counted <= analytic + 2 * 4 * 8 / 64
