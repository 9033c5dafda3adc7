"""Which parts of the student a pipeline rank builds: `StagePlan`.

The decoder blocks are split into `pp * chunks` contiguous virtual stages of proportional depth
(virtual stage k holds blocks k * L // K .. (k + 1) * L // K - 1 of L over K stages: equal for the
student, whose config must divide evenly; a colocated teacher of another depth is cut at the same
fractions, so its stages line up with the student's); virtual
stage k = chunk * pp + pp_rank (Megatron's interleaved placement, engine.parallel.virtual_stage), so pipeline
rank r holds chunks 0..chunks-1 with the blocks of virtual stages r, r + pp, ... The embedding (and
GPT-2's positions) live on virtual stage 0, i.e. chunk 0 of rank 0; the final norm, the output
layer and the MTP heads on the last virtual stage, chunk chunks-1 of rank pp-1. Blocks keep their
global index wherever they run (`decoder.{i}`), so parameter names, checkpoints and activation
buffer names are those of the whole model.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel import ParallelConfig, ParallelLayout, stage_owner, virtual_stage
from layers.buffers import parse_block_buffer


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

    @classmethod
    def every_rank(cls, layers: int, parallel: ParallelConfig) -> list[StagePlan]:
        """The plan of each of the students' pipeline ranks under `parallel`, stage 0 first."""
        return [cls(layers=layers, pp=parallel.pp, pp_rank=p, chunks=parallel.virtual_stages)
                for p in range(parallel.pp)]

    @property
    def virtual_stages(self) -> int:
        return self.pp * self.chunks

    def _start(self, virtual: int) -> int:
        return virtual * self.layers // self.virtual_stages

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
        virtual = self.virtual_stage(chunk)
        return range(self._start(virtual), self._start(virtual + 1))

    def virtual_stage(self, chunk: int) -> int:
        """The virtual stage this rank's `chunk` runs."""
        return virtual_stage(chunk, pp=self.pp, pp_rank=self.pp_rank)

    def runs(self, virtual: int) -> bool:
        """Whether this pipeline rank runs `virtual` stage (as one of its chunks)."""
        return stage_owner(virtual, pp=self.pp)[0] == self.pp_rank

    def layers_here(self) -> list[int]:
        return [i for c in range(self.chunks) for i in self.chunk_layers(c)]

    def virtual_of(self, layer: int) -> int:
        """The virtual stage that runs global block `layer`."""
        return next(v for v in range(self.virtual_stages) if layer < self._start(v + 1))

    def owner(self, layer: int) -> tuple[int, int]:
        """(pipeline rank, chunk) that runs global block `layer`."""
        return stage_owner(self.virtual_of(layer), pp=self.pp)

    def buffer_stage(self, name: str) -> int:
        """The virtual stage that publishes activation buffer `name` (layers/buffers.py)."""
        if name == "embedding":
            return 0
        parsed = parse_block_buffer(name)
        if parsed is not None and parsed[0] == "decoder":
            return self.virtual_of(parsed[1])
        return self.virtual_stages - 1  # final_hidden and the MTP heads' buffers
