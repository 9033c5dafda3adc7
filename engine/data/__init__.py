"""Data: Megatron indexed datasets, text preprocessing, the bundled corpus, training samples.

    cfg = DataConfig(path="default", seq_len=256, micro_batch=4, global_batch=8)
    batches = TokenBatches(cfg, seed=1234, dp_rank=layout.dp_rank, dp=layout.dp)
    for micro_batch in batches.next_step():      # {"input_ids", "labels"}: LongTensor [mb, seq]
        ...
    checkpoint["data"] = batches.state_dict()    # plain ints; load_state_dict resumes exactly
"""

from engine.data.config import DataConfig, check_batch_layout, resolve_data_path, split_fractions
from engine.data.corpus import EOD_TOKEN, default_corpus
from engine.data.dataset import (
                                 EAGER_SCAN_BYTES,
                                 IGNORE_INDEX,
                                 Blend,
                                 PackedSamples,
                                 TokenBatches,
                                 check_datasets,
                                 shift_labels,
                                 split_documents,
                                 to_device,
)
from engine.data.encode import (
                                 EOD_CANDIDATES,
                                 Record,
                                 check_inputs,
                                 document_text,
                                 encode_to_indexed,
                                 file_records,
                                 find_eod_id,
                                 load_tokenizer,
)
from engine.data.indexed import DataError, IndexedTokens, IndexedWriter, dtype_for_vocab, write_indexed

__all__ = [
    "DataConfig", "check_batch_layout", "resolve_data_path", "split_fractions",
    "EOD_TOKEN", "default_corpus",
    "EAGER_SCAN_BYTES", "IGNORE_INDEX", "Blend", "PackedSamples", "TokenBatches", "check_datasets",
    "shift_labels", "split_documents", "to_device",
    "EOD_CANDIDATES", "Record", "check_inputs", "document_text", "encode_to_indexed", "file_records",
    "find_eod_id", "load_tokenizer",
    "DataError", "IndexedTokens", "IndexedWriter", "dtype_for_vocab", "write_indexed",
]
