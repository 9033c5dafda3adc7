"""`TransformerLM`: a decoder-only LM (Llama or GPT-2 family), tensor- and sequence-parallel.

Layout. Activations are batch-first. The residual stream is `[batch, seq, hidden]` replicated over
the TP group, or `[batch, seq/tp, hidden]` split along the sequence (dim 1) under SP. Input ids are
the full `[batch, seq]` on every TP rank; logits are this rank's vocabulary shard
`[batch, seq, padded_vocab/tp]` (rank r holds columns r*V/tp .. (r+1)*V/tp-1) and are never
gathered. With `final_logit_softcap` = c they are c * tanh(head_hidden @ output_weight.T / c)
(the fused losses, given `head_hidden` and `output_weight`, cap their tiles themselves). Columns
past `config.vocab_size` hold the dtype's lowest value (zero probability).

Gradients. After `loss.backward()` every gradient is complete: split parameters hold their shard's
gradient, replicated ones the full gradient, identical on all TP ranks (under SP the replicated
parameters used on sequence shards are summed over TP inside autograd; see
layers/tensor_parallel.py). The trainer only all-reduces over data parallelism. Parameters carry
`tp_split_dim` (None = replicated over TP) and `vocab_parallel`, see layers/params.py.

Multi-token prediction. With `mtp_heads = k`, head j (1..k) is its own decoder block applied to the
trunk's last residual stream (the heads are independent, not chained), followed by the shared final
norm and the shared output layer; its logits at position t predict token t+1+j (targets:
`engine.data.shift_labels(input_ids, 1 + j)`).

Initialization depends on (seed, parameter name) only, not on TP or PP (layers/params.py).

Pipeline stages. Under PP (`layout.pp > 1`) the model builds only its rank's parts
(layers/stages.py): `decoder` is a ModuleDict keyed by GLOBAL block index, so `decoder.{i}` names
the same parameters and buffers on any layout. The pipeline drives `embed` (first stage),
`run_chunk` (the blocks of one chunk) and `finish` (last stage: final norm, MTP heads, logits);
`forward` is the three in a row and needs the whole model. With tied embeddings the last stage
holds its own copy of `embedding.weight` for the output layer; the trainer keeps the two copies'
gradients summed over the pipeline's embedding group.

Decoding (layers/decode.py) runs these same modules over new columns with a `KVCache`
(layers/kv_cache.py): `embed` and `rope` take the columns' positions, `run_chunk` the cache, and
`finish(mtp=False)` skips the MTP heads (a training objective).

Activation recomputation (`recompute=`, the run's `train.recompute`) is a way of training the model,
not part of its architecture: it is chosen when the model is built for training, changes no
parameter and no result, and applies only to forwards that record autograd (layers/recompute.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from engine import collectives as C
from engine.parallel import ParallelLayout
from engine.param_tags import tag
from layers.block import DecoderBlock
from layers.buffers import ActivationBuffer, BufferRecorder, block_name, buffer_names
from layers.config import ModelConfig, check_model_layout
from layers.context import TokenLayout
from layers.kv_cache import KVCache
from layers.moe import MoE
from layers.norm import make_norm
from layers.params import full_init, new_param
from layers.recompute import Recompute
from layers.rng import DropoutRNG
from layers.rope import RopeTables, Rotary
from layers.sharding import full_shape, shard_of
from layers.stages import StagePlan
from layers.tensor_parallel import VocabParallelEmbedding, VocabParallelLMHead, sp_shared


@dataclass
class ModelOutput:
    """What one forward returns; shapes are per rank (see the module docstring)."""

    # [batch, seq, padded_vocab/tp]: the next-token head; None when compute_logits=False
    logits: torch.Tensor | None
    # MTP heads 1..k, each like `logits`; empty when compute_logits=False
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    # [batch, seq, hidden], the output layer's input: logits = head_hidden @ output_weight.T,
    # soft-capped by config.final_logit_softcap
    head_hidden: torch.Tensor | None = None
    mtp_hidden: list[torch.Tensor] = field(default_factory=list)  # the same for each MTP head
    buffers: dict[str, ActivationBuffer] = field(default_factory=dict)  # the names asked for


class TransformerLM(nn.Module):
    def __init__(self, config: ModelConfig, layout: ParallelLayout, *, seed: int = 0,
                 recompute: Recompute = "none"):
        super().__init__()
        check_model_layout(config, layout.tp, layout.ep, layout.etp)
        self.config, self.layout, self.seed = config, layout, seed
        self.plan = plan = StagePlan.of(config.layers, layout)
        self.rng = DropoutRNG(seed, layout)
        padded_vocab = config.padded_vocab(layout.tp)
        first, last = plan.has_embedding, plan.has_head
        self.embedding = VocabParallelEmbedding(padded_vocab, config.hidden, layout=layout,
                                                init_std=config.init_std) \
            if first or (last and config.tie_embeddings) else None
        self.position_embedding = LearnedPositions(config, layout) \
            if first and config.family == "gpt2" else None
        self.rotary = Rotary(config, layout.device) if config.family == "llama" else None
        self.decoder = nn.ModuleDict({
            str(i): DecoderBlock(config, layout, self.rng, name=block_name(i), layer=i,
                                 recompute=recompute)
            for i in plan.layers_here()})
        self.mtp = nn.ModuleDict({
            str(j): DecoderBlock(config, layout, self.rng, name=block_name(j, mtp=True), layer=None,
                                 recompute=recompute)
            for j in range(1, config.mtp_heads + 1)} if last else {})
        self.final_norm = make_norm(config, layout) if last else None
        self.lm_head = VocabParallelLMHead(
            vocab_size=config.vocab_size, padded_vocab=padded_vocab, hidden=config.hidden,
            layout=layout, tied=self.embedding if config.tie_embeddings else None,
            init_std=config.init_std, softcap=config.final_logit_softcap) if last else None
        if last and not first and self.embedding is not None:
            # the tied output layer's copy: its gradient is summed with the first stage's, so the
            # global gradient norm must not count it twice (engine/optim.py)
            tag(self.embedding.weight, pp_duplicate=True)
        self.reset_parameters()

    @property
    def output_weight(self) -> nn.Parameter:
        """This rank's `[padded_vocab/tp, hidden]` output weight (the embedding's when tied)."""
        return self.lm_head.weight_shard()

    def moe_blocks(self) -> list[MoE]:
        """This rank's mixture-of-experts MLPs, in block order."""
        return [block.mlp for block in self.decoder.values() if isinstance(block.mlp, MoE)]

    def set_moe_loss_scale(self, scale: float) -> None:
        """The weight of every MoE block's auxiliary losses in the backward (layers/moe.py)."""
        for moe in self.moe_blocks():
            moe.loss_scale = scale

    def pop_moe_losses(self) -> dict[str, float]:
        """Per loss, the sum over this rank's MoE blocks of each block's mean over the forwards since
        the last call (a recomputed forward counts twice and cancels out); resets them."""
        sums = {}
        for moe in self.moe_blocks():
            for name, value in moe.pop_losses().items():
                sums[name] = sums.get(name, 0.0) + value
        return sums

    def buffer_names(self) -> list[str]:
        """Every activation name `forward(buffers=...)` accepts (see layers/buffers.py)."""
        config = self.config
        moe_layers = [i for i in range(config.layers) if config.is_moe_layer(i)]
        return buffer_names(config.layers, config.mtp_heads, moe_layers)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill every parameter with this rank's slice of its seeded full value."""
        tp, padded_vocab = self.layout.tp, self.config.padded_vocab(self.layout.tp)
        for name, param in self.named_parameters():
            shape = full_shape(param, tp=tp, vocab_size=self.config.vocab_size)
            full = full_init(param.init, shape, seed=self.seed, name=name)
            param.copy_(shard_of(param, full, layout=self.layout, padded_vocab=padded_vocab))

    def forward(self, input_ids: torch.Tensor, *, buffers: Collection[str] = (),
                compute_logits: bool = True, positions: torch.Tensor | None = None,
                documents: torch.Tensor | None = None, cp_chunks: bool = False) -> ModelOutput:
        """Token ids `[batch, seq]` (full on every TP rank) -> logits shards and requested buffers.
        The whole model only (no pipeline); a stage runs `embed`, `run_chunk`, `finish`.

        `positions` (`[seq]` or `[batch, seq]`): the tokens' global positions, when they are not
        0..seq-1: this CP rank's chunks of a longer sequence (layers/context.py: keys and values
        are then gathered over the CP group, `cp_chunks`) or positions restarting per document.
        `documents` `[batch, seq]`: each token's document, which its attention stays inside."""
        if not self.plan.whole:
            raise RuntimeError("forward() needs the whole model; a pipeline stage runs embed, "
                               "run_chunk and finish")
        record = self.recorder(buffers)
        positions, tokens = self.token_layout(input_ids, positions=positions, documents=documents,
                                              cp_chunks=cp_chunks)
        hidden = self.embed(input_ids, record, positions)
        rope = self.rope(input_ids, hidden.dtype, positions)
        hidden = self.run_chunk(0, hidden, rope, record, tokens)
        return self.finish(hidden, rope, record, compute_logits=compute_logits, tokens=tokens)

    def token_layout(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                     documents: torch.Tensor | None = None, cp_chunks: bool = False,
                     ) -> tuple[torch.Tensor | None, TokenLayout | None]:
        """(positions, the `TokenLayout` its blocks attend by) of one forward's tokens (`forward`'s
        arguments); (None, None) for one whole causal sequence at positions 0..seq-1. A pipeline
        stage builds it per micro-batch and hands the positions to `embed` and `rope`, the layout
        to `run_chunk`."""
        if positions is None and documents is None:
            return None, None
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return positions, TokenLayout(self, positions=positions, documents=documents,
                                      cp_chunks=cp_chunks)

    def recorder(self, buffers: Collection[str]) -> BufferRecorder:
        """Keeps the asked-for buffers of one forward (of the parts this stage runs)."""
        return BufferRecorder(buffers, self.buffer_names(), seq_sharded=self.layout.sp)

    def rope(self, input_ids: torch.Tensor, dtype: torch.dtype,
             positions: torch.Tensor | None = None) -> RopeTables | None:
        """Rotary tables (per rope kind) for `input_ids`' length, or for `[batch, seq]` `positions`
        (decoding); None for learned positions."""
        if self.rotary is None:
            return None
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=self.layout.device)
        return self.rotary(positions, dtype)

    def embed(self, input_ids: torch.Tensor, record,
              positions: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: token ids `[batch, seq]` -> residual stream `[batch, seq(/tp), hidden]`.
        `positions` `[batch, seq]`: those of decoded columns (default 0..seq-1)."""
        self._check_input(input_ids)
        hidden = self.embedding(input_ids)
        if self.config.scale_embeddings:
            # sqrt(hidden) rounded to fp32, then to the embedding's dtype, as Gemma's reference does
            hidden = hidden * torch.tensor(self.config.hidden ** 0.5).to(hidden.dtype)
        if self.position_embedding is not None:
            hidden = hidden + self.position_embedding(input_ids.shape[1], positions)
        hidden = self.rng.dropout(hidden, self.config.dropout, sharded=self.layout.sp,
                                  training=self.training)
        record("embedding", hidden)
        return hidden

    def run_chunk(self, chunk: int, hidden: torch.Tensor, rope, record,
                  cache: KVCache | TokenLayout | None = None) -> torch.Tensor:
        """The residual stream through this rank's blocks of `chunk` (all blocks without PP)."""
        for i in self.plan.chunk_layers(chunk):
            hidden = self.decoder[str(i)](hidden, rope, record, cache)
        return hidden

    def finish(self, hidden: torch.Tensor, rope, record, *, compute_logits: bool = True,
               mtp: bool = True, tokens: TokenLayout | None = None) -> ModelOutput:
        """Last stage: the trunk's last residual stream -> final norm, MTP heads (unless `mtp` is
        False; their attention sees the keys `tokens` says, as the trunk's does), logits shards."""
        final_hidden = self.final_norm(hidden)
        record("final_hidden", final_hidden)
        head_hidden = self.lm_head.head_input(final_hidden)  # [batch, seq, hidden]
        heads = self.mtp.values() if mtp else ()
        mtp_hidden = [self.lm_head.head_input(self.final_norm(block(hidden, rope, record, tokens)))
                      for block in heads]
        return ModelOutput(
            logits=self.lm_head(head_hidden) if compute_logits else None,
            mtp_logits=[self.lm_head(h) for h in mtp_hidden] if compute_logits else [],
            head_hidden=head_hidden, mtp_hidden=mtp_hidden, buffers=record.buffers)

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer [batch, seq] (got {input_ids.dtype} "
                             f"of shape {tuple(input_ids.shape)})")
        seq = input_ids.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence length {seq} exceeds model.max_seq_len="
                             f"{self.config.max_seq_len}")
        if self.layout.sp and seq % self.layout.tp:  # (under CP: this rank's chunks)
            raise ValueError(f"sequence length {seq} does not split over parallel.tp="
                             f"{self.layout.tp} ranks (parallel.sp=true needs seq % tp == 0)")


class LearnedPositions(nn.Module):
    """GPT-2's absolute position table `[max_seq_len, hidden]`, replicated over TP."""

    def __init__(self, config: ModelConfig, layout: ParallelLayout):
        super().__init__()
        self.layout = layout
        self.weight = new_param(config.max_seq_len, config.hidden, tp_split_dim=None,
                                init=config.init_std, device=layout.device)

    def forward(self, seq: int, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Rows for positions 0..seq-1, this rank's sequence shard of them under SP; or the rows of
        `[batch, seq]` `positions` (decoding, never SP)."""
        if positions is not None:  # decoded columns, or a CP rank's chunks (split under SP)
            rows = sp_shared(self.weight, self.layout)[positions]  # [(batch,) seq, hidden]
            return C.split_along(rows, self.layout.tp_group, dim=-2) if self.layout.sp else rows
        rows = sp_shared(self.weight[:seq], self.layout)  # [seq, hidden]
        if self.layout.sp:
            rows = C.split_along(rows, self.layout.tp_group, dim=0)  # [seq/tp, hidden]
        return rows
