"""The model: tensor/sequence-parallel transformer layers with named activation buffers.

- `config.py`: `ModelConfig` (+ `RopeScaling`), `check_model_layout(config, tp)`.
- `model.py`: `TransformerLM(config, layout, seed=, recompute=)`, `ModelOutput`; the stage parts
  `embed`, `run_chunk`, `finish` that the pipeline and decoding drive.
- `tensor_parallel.py`: Column/RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead and
  the TP/SP region boundaries; why there is no gradient-finalize step under SP.
- `attention.py`, `mlp.py`, `norm.py`, `rope.py`, `block.py`: the pieces of a decoder block.
- `kv_cache.py`: `KVCache`, the option of the model's own blocks and attention that decoding uses.
- `buffers.py`: `ActivationBuffer`, the buffer names a model publishes, formatted and parsed.
- `stages.py`: `StagePlan`, which blocks (and embedding/head) a pipeline rank builds.
- `quant.py`: ternary (BitNet b1.58) weights and 8-bit activations for `model.quant: ternary`.
- `recompute.py`: activation recomputation (`train.recompute`: selective or full) and why it is exact.
- `params.py`, `rng.py`: per-parameter sharding tags, TP-independent init, dropout RNG streams.
- `sharding.py`: full (unsharded) state dicts, gathered and loaded at any TP degree.
- `hf.py`: Hugging Face configs and state dicts of Llama, Qwen2, Mistral and GPT-2, both ways.
- `decode.py`: incremental forward through the same modules (any TP, PP, no SP), greedy/sampled
  `generate`.
"""

from layers.buffers import ActivationBuffer
from layers.config import ModelConfig, RopeScaling, check_model_layout
from layers.model import ModelOutput, TransformerLM

__all__ = ["ActivationBuffer", "ModelConfig", "ModelOutput", "RopeScaling", "TransformerLM",
           "check_model_layout"]
