"""Which parts of the student a pipeline rank builds: `StagePlan`.

The decoder blocks are split into `pp * chunks` contiguous virtual stages of equal depth; virtual
stage k = chunk * pp + pp_rank (Megatron's interleaved placement, engine/pipeline.py), so pipeline
rank r holds chunks 0..chunks-1 with the blocks of virtual stages r, r + pp, ... The embedding (and
GPT-2's positions) live on virtual stage 0, i.e. chunk 0 of rank 0; the final norm, the output
layer and the MTP heads on the last virtual stage, chunk chunks-1 of rank pp-1. Blocks keep their
global index wherever they run (`decoder.{i}`), so parameter names, checkpoints and activation
buffer names are those of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel import ParallelLayout


@dataclass(frozen=True)
class StagePlan:
    layers: int  # decoder blocks of the whole model
    pp: int = 1
    pp_rank: int = 0
    chunks: int = 1  # virtual stages per pipeline rank

    @classmethod
    def of(cls, layers: int, layout: ParallelLayout) -> StagePlan:
        """The plan of this rank of `layout`'s pipeline (the whole model without PP)."""
        return cls(layers=layers, pp=layout.pp, pp_rank=layout.pp_rank,
                   chunks=layout.virtual_stages)

    def __post_init__(self):
        if self.layers % (self.pp * self.chunks):
            raise ValueError(f"{self.layers} layers do not split into {self.pp} x {self.chunks} "
                             "equal virtual stages")

    @property
    def per_virtual_stage(self) -> int:
        return self.layers // (self.pp * self.chunks)

    @property
    def whole(self) -> bool:
        return self.pp == 1

    @property
    def has_embedding(self) -> bool:
        return self.pp_rank == 0

    @property
    def has_head(self) -> bool:
        return self.pp_rank == self.pp - 1

    def chunk_layers(self, chunk: int) -> range:
        """Global indices of the blocks of this rank's `chunk`, in forward order."""
        first = (chunk * self.pp + self.pp_rank) * self.per_virtual_stage
        return range(first, first + self.per_virtual_stage)

    def layers_here(self) -> list[int]:
        return [i for c in range(self.chunks) for i in self.chunk_layers(c)]

    def owner(self, layer: int) -> tuple[int, int]:
        """(pipeline rank, chunk) that runs global block `layer`."""
        virtual = layer // self.per_virtual_stage
        return virtual % self.pp, virtual // self.pp
