"""The mixture-of-experts MLP: dropless top-k routing, expert parallelism over DP x CP ranks.

Routing. A replicated router `[experts, hidden]` scores each token (softmax, or sigmoid for
DeepSeek-style routers), keeps its `top_k` experts and their scores (renormalized to sum to one
with `norm_topk_prob`). No capacity factor: every token reaches every expert it chose.

Tokens. The block runs on the residual stream's tokens. Under SP each TP rank routes its own
sequence shard; under TP without SP each rank takes its 1/tp share of the sequence
(`scatter_to_sp`) and the outputs are all-gathered back (`gather_from_sp_replicated`), so no token
is computed twice; where the sequence does not split (a decoded column at TP > 1) every TP rank
computes all tokens, identically. Whenever the ranks of a TP group see different tokens, the router
and expert weights go through `copy_to_tp`, whose backward sums their partial gradients.

Expert parallelism. With `parallel.ep > 1` the experts of each block are split over the EP group,
formed inside the DP x CP ranks (rank r holds experts r*E/ep .. (r+1)*E/ep - 1, named by their
global index, so checkpoints and Hugging Face conversion see the same names at any EP). The token
copies are sorted by expert, sent to the rank holding their expert with one `all_to_all` (the
per-expert counts go first, with another), regrouped by expert, run through each local expert as one
matrix product per weight (a loop over this rank's experts, never over tokens; an expert with no
token runs on zero rows, so every expert has a gradient), sent back with the reverse `all_to_all`
and combined with their routing weights. Expert weights are tagged `expert`: their gradients are
summed over the expert-DP group (engine/optim.py), not the whole DP x CP group.

Expert tensor parallelism. With `parallel.etp` = tp each routed expert's inner width is split over
the TP group (gate/up by rows, down by columns, tagged `tp_split_dim` so checkpoints and
conversion see whole experts). The tokens stay split over TP as above; after the EP exchange every
TP rank's rows reach every TP rank of the group (`all_to_all`), each rank runs its slices on all
of them, and each gets the partial outputs of its own rows back and sums them. The split experts
thus see each token once: their gradients are whole without `copy_to_tp`.

Auxiliary losses (per block and micro-batch, on the statistics of all its tokens: summed over TP
when the tokens are split, and over CP, whose ranks hold other chunks of the same sequences): the
load-balancing loss E * sum_e f_e * P_e (f_e: the share of tokens that chose expert e, counted over
the top-k choices as Mixtral and Qwen-MoE count them; P_e: the mean router probability) and the
z-loss mean(logsumexp(logits)^2). Their weighted sum does not add to the returned activations:
`attach_loss` gives it a gradient in the backward (as if it were added to the objective with weight
`MoE.loss_scale`, which the trainer sets so that the step's auxiliary loss is the mean over all its
micro-batches). This works unchanged under pipeline parallelism and recomputation. The unweighted
values of the last forward are in `MoE.last_losses`; their sums over forwards, for logging, come
from `pop_losses`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine import collectives as C
from engine.mappings import all_to_all, copy_to_tp, gather_from_sp_replicated, reduce_from_tp, scatter_to_sp
from engine.parallel import ParallelLayout
from engine.param_tags import tag
from layers.config import ModelConfig
from layers.mlp import ACTIVATION_FNS, MLP
from layers.params import new_param
from layers.tensor_parallel import SEQ_DIM


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, loss, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_full((), ctx.scale), None


def attach_loss(x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
    """Forward: `x` unchanged. Backward: `x`'s gradient passes, and `loss` gets gradient `scale`."""
    if not (torch.is_grad_enabled() and loss.requires_grad):
        return x
    return _AttachLoss.apply(x, loss, scale)


class _Weight(nn.Module):
    """One weight `[out, in]` (this rank's slice along `tp_split_dim`; None: replicated over TP),
    under Hugging Face's name `{name}.weight`."""

    def __init__(self, out_features: int, in_features: int, *, init: float, layout: ParallelLayout,
                 expert: bool = False, tp_split_dim: int | None = None):
        super().__init__()
        self.weight = new_param(out_features, in_features, tp_split_dim=tp_split_dim, init=init,
                                device=layout.device)
        tag(self.weight, expert=expert)


class Expert(nn.Module):
    """A gated MLP (SwiGLU-style, the model's activation) applied to the rows routed to it; with
    `etp > 1` this rank's slice of its inner width (gate/up by rows, down by columns), whose
    output is a partial sum over the TP ranks."""

    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        out_std = config.init_std / math.sqrt(2 * config.layers)
        ffn = config.moe.expert_ffn_hidden // layout.etp  # [ffn/etp] here
        inner, outer = (0, 1) if layout.etp > 1 else (None, None)
        self.gate_proj = _Weight(ffn, config.hidden, init=config.init_std, layout=layout, expert=True,
                                 tp_split_dim=inner)
        self.up_proj = _Weight(ffn, config.hidden, init=config.init_std, layout=layout, expert=True,
                               tp_split_dim=inner)
        self.down_proj = _Weight(config.hidden, ffn, init=out_std, layout=layout, expert=True,
                                 tp_split_dim=outer)
        self.act = ACTIVATION_FNS[config.mlp_activation]

    def forward(self, rows: torch.Tensor, weight) -> torch.Tensor:
        """`rows` `[n, hidden]` -> `[n, hidden]`; `weight(w)` maps each weight as the caller needs."""
        inner = self.act(F.linear(rows, weight(self.gate_proj.weight))) * F.linear(
            rows, weight(self.up_proj.weight))
        return F.linear(inner, weight(self.down_proj.weight))


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        moe = self.moe = config.moe
        self.layout = layout
        self.experts_here = moe.experts // layout.ep  # experts on this rank
        first = layout.ep_rank * self.experts_here
        self.router = _Weight(moe.experts, config.hidden, init=config.init_std, layout=layout)
        self.experts = nn.ModuleDict({str(e): Expert(config, layout)
                                      for e in range(first, first + self.experts_here)})
        self.shared_expert = MLP(config, layout, ffn_hidden=moe.shared_ffn_hidden) \
            if moe.shared_experts else None
        self.shared_expert_gate = _Weight(1, config.hidden, init=config.init_std, layout=layout) \
            if moe.shared_expert_gate else None
        self.loss_scale = 1.0  # the auxiliary losses' weight in the backward (set by the trainer)
        self.last_losses: dict[str, torch.Tensor] = {}
        self._sums: list[torch.Tensor] = []  # [aux, z] of each forward since `pop_losses`

    def pop_losses(self) -> dict[str, float]:
        """The unweighted auxiliary losses' means over the forwards since the last call."""
        if not self._sums:
            return {}
        mean = torch.stack(self._sums).mean(0).tolist()
        self._sums = []
        return {"moe_aux_loss": mean[0], "moe_z_loss": mean[1]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream `[batch, seq(/tp), hidden]` -> (MoE output, same layout; router logits
        `[batch, seq(/tp), experts]`, same layout)."""
        layout = self.layout
        split = layout.tp > 1 and (layout.sp or x.shape[SEQ_DIM] % layout.tp == 0)
        scatter = split and not layout.sp
        x_local = scatter_to_sp(x, layout.tp_group, seq_dim=SEQ_DIM) if scatter else x

        def weight(w: torch.Tensor) -> torch.Tensor:  # partial gradients when the tokens are split
            return copy_to_tp(w, layout.tp_group) if split else w
        # (split experts see every TP rank's tokens: their gradients are whole)

        batch, seq, hidden = x_local.shape
        tokens = x_local.reshape(batch * seq, hidden)
        logits = F.linear(tokens, weight(self.router.weight))  # [tokens, experts]
        scores, chosen = self._route(logits)
        out = self._dispatch(tokens, scores, chosen, weight if layout.etp == 1 else (lambda w: w))
        out = out.view(batch, seq, hidden)
        losses = self._aux_losses(logits, chosen, split)
        out = attach_loss(out, losses, self.loss_scale)
        logits = logits.view(batch, seq, -1)
        if scatter:
            out = gather_from_sp_replicated(out, layout.tp_group, seq_dim=SEQ_DIM)
            logits = gather_from_sp_replicated(logits, layout.tp_group, seq_dim=SEQ_DIM)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(F.linear(x, self._replicated(self.shared_expert_gate.weight))) * shared
            out = out + shared
        return out, logits

    def _replicated(self, w: torch.Tensor) -> torch.Tensor:
        """A replicated weight applied to the residual stream (a sequence shard under SP)."""
        return copy_to_tp(w, self.layout.tp_group) if self.layout.sp else w

    def _route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(routing weights `[tokens, top_k]` in the logits' dtype, chosen experts `[tokens, top_k]`)."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        if self.moe.router == "softmax":
            probs = torch.softmax(logits, dim=-1, dtype=dtype)
        else:
            probs = torch.sigmoid(logits.to(dtype))
        scores, chosen = torch.topk(probs, self.moe.top_k, dim=-1)
        if self.moe.norm_topk_prob:
            scores = scores / scores.sum(dim=-1, keepdim=True)
        return scores.to(logits.dtype), chosen

    def _dispatch(self, tokens: torch.Tensor, scores: torch.Tensor, chosen: torch.Tensor,
                  weight) -> torch.Tensor:
        """Every token's top-k expert outputs, weighted and summed: `[tokens, hidden]`."""
        top_k, experts = self.moe.top_k, self.moe.experts
        flat = chosen.reshape(-1)  # [tokens * top_k]: the expert of each token copy
        order = torch.argsort(flat, stable=True)  # copies grouped by expert
        source = order // top_k  # the token of each sorted copy
        rows = tokens[source]
        counts = torch.bincount(flat, minlength=experts)  # [experts]
        layout = self.layout
        if layout.ep > 1:
            per_rank = counts.view(layout.ep, self.experts_here)
            received = C.all_to_all_single(per_rank, layout.ep_group)  # [ep, experts_here] by source
            send, recv = per_rank.sum(1).tolist(), received.sum(1).tolist()
            rows = all_to_all(rows, layout.ep_group, send_splits=send, recv_splits=recv)
            outputs = self._local_experts(rows, received, weight)
            outputs = all_to_all(outputs, layout.ep_group, send_splits=recv, recv_splits=send)
        else:
            outputs = self._local_experts(rows, counts.view(1, -1), weight)
        weighted = outputs * scores.reshape(-1)[order, None]
        return torch.zeros_like(tokens).index_add(0, source, weighted)

    def _local_experts(self, rows: torch.Tensor, counts: torch.Tensor, weight) -> torch.Tensor:
        """This rank's experts on `rows` `[n, hidden]`, which come as blocks by source rank, each
        sorted by expert (`counts` `[sources, experts_here]`): the outputs, in the same order."""
        if self.layout.etp > 1:
            return self._split_experts(rows, counts, weight)
        return self._by_expert(rows, counts, weight)

    def _by_expert(self, rows: torch.Tensor, counts: torch.Tensor, weight) -> torch.Tensor:
        """`_local_experts` of whole experts: the rows regrouped by expert, one matrix product per
        weight and expert, the outputs put back in the rows' order."""
        sources = counts.shape[0]
        if sources > 1:  # regroup the rows by expert
            segment = torch.arange(counts.numel(), device=rows.device).repeat_interleave(counts.reshape(-1))
            by_expert = torch.argsort(segment % self.experts_here * sources + segment // self.experts_here,
                                      stable=True)
            rows = rows[by_expert]
        outputs = torch.cat([expert(part, weight) for expert, part in
                             zip(self.experts.values(), rows.split(counts.sum(0).tolist()))])
        if sources > 1 and outputs.shape[0]:
            outputs = torch.empty_like(outputs).index_copy(0, by_expert, outputs)
        return outputs

    def _split_experts(self, rows: torch.Tensor, counts: torch.Tensor, weight) -> torch.Tensor:
        """`_by_expert` with each expert split over TP (`etp`): every TP rank's rows go to every TP
        rank (`all_to_all`), each computes its slice's partial outputs of all of them, and each
        rank gets its own rows' partials back and sums them."""
        layout = self.layout
        group, tp, mine = layout.tp_group, layout.tp, rows.shape[0]
        every = C.all_gather(counts.reshape(1, -1), group).view(tp * counts.shape[0], -1)
        per_rank = every.view(tp, -1).sum(1).tolist()  # rows of each TP rank
        gathered = all_to_all(rows.repeat(tp, 1), group, send_splits=[mine] * tp, recv_splits=per_rank)
        partial = self._by_expert(gathered, every, weight)  # [sum(per_rank), hidden] partial sums
        back = all_to_all(partial, group, send_splits=per_rank, recv_splits=[mine] * tp)
        return back.view(tp, mine, rows.shape[1]).sum(0)

    def _aux_losses(self, logits: torch.Tensor, chosen: torch.Tensor, split: bool) -> torch.Tensor:
        """The weighted load-balancing and z-losses over this micro-batch's tokens (a scalar)."""
        moe = self.moe
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits, dim=-1, dtype=dtype)
        counts = torch.bincount(chosen.reshape(-1), minlength=moe.experts).to(dtype)
        stats = torch.cat([counts, logits.new_full((1,), logits.shape[0], dtype=dtype)])
        prob_sums = probs.sum(0)
        z_sum = torch.logsumexp(logits.to(dtype), dim=-1).pow(2).sum()
        # The micro-batch's tokens are spread over the TP group (when split) and the CP group; each
        # rank then holds the same losses, whose gradients reach its own tokens only (backward:
        # identity), and the routers' partial gradients are summed over TP and CP as its tokens' are.
        for spread, group in ((split, self.layout.tp_group), (self.layout.cp > 1, self.layout.cp_group)):
            if spread:
                stats = C.all_reduce(stats, group)
                prob_sums, z_sum = reduce_from_tp(prob_sums, group), reduce_from_tp(z_sum, group)
        counts, tokens = stats[:-1], stats[-1]
        balance = moe.experts * (counts / tokens * prob_sums / tokens).sum()
        z_loss = z_sum / tokens
        self.last_losses = {"moe_aux_loss": balance.detach(), "moe_z_loss": z_loss.detach()}
        if torch.is_grad_enabled():  # training forwards only (a teacher's or an evaluation's are not logged)
            self._sums.append(torch.stack([balance.detach(), z_loss.detach()]))
        return moe.aux_loss_coef * balance + moe.z_loss_coef * z_loss
