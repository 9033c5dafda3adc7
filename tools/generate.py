"""Continue prompts with a checkpoint (KV-cached, greedy or sampled, any TP and PP), or write a
sequence-level distillation dataset of a teacher's continuations.

    torchrun --nproc_per_node N tools/generate.py --ckpt CKPT_DIR --tokens PROMPTS.npy --out OUT.npy \\
        --max-new-tokens N [--greedy | --temperature T --top-k K --top-p P --seed S] [--eos-id ID]
    python tools/generate.py --ckpt CKPT_DIR --prompts FILE [--json-key text] [--out OUT.jsonl] ...
    python tools/generate.py --ckpt TEACHER --data PREFIX --num-prompts N --prompt-len L \\
        --max-new-tokens M --out OUT_PREFIX                      # sequence-level KD dataset

Ids contract (like tools/score.py): `--tokens` holds integer ids `[batch, prompt_len]` (every row a
full prompt); `--out OUT.npy` gets int64 generated ids `[batch, max_new_tokens]`. A row stops after
its end-of-sequence id (`--eos-id`; with `--tokens` there is none unless given) and its later
columns repeat that id. `--greedy` (the default when no sampling option is given) is argmax.

Text: `--prompts FILE` is one prompt per non-blank line, or JSONL with `--json-key`; prompts of
different lengths are left-padded (layers/decode.py). Text is encoded and decoded with the
checkpoint's tokenizer (`--tokenizer`, else the `tokenizer/` an imported checkpoint carries, else
the `tokenizer.json` beside the run's dataset, which the bundled corpus has); generation stops at
its end-of-document token. `--out OUT.jsonl` gets one JSON object per prompt (`prompt`,
`completion`, `ids`); without `--out` the completions are printed.

Sequence-level KD (`--data PREFIX`, an indexed dataset or `default`): `--num-prompts` prompts of
`--prompt-len` tokens are drawn from the train split exactly as training draws samples
(engine.data.TokenBatches, `--seed`), continued by the checkpoint, and written as the indexed
dataset `OUT_PREFIX.{bin,idx}`: one document per prompt, prompt + continuation (its EOS included
when it stopped) + the end-of-document id when not. `OUT_PREFIX-generated.{bin,idx}` has the same
document lengths and holds 1 where the token was generated, 0 elsewhere. A student trains on the
first with the ordinary entry point (`data.path=OUT_PREFIX`: packed like any corpus, LM loss on
every token, optional logit KD on the same tokens). The work is done in chunks of `--micro-batch`
prompts saved under `OUT_PREFIX.partial/`; a rerun with the same arguments and the same weights
resumes after the last saved chunk (weights the chunks were not made with, as when `--ckpt` is a
directory whose `latest` training has moved on, are refused with one line naming both checkpoints),
and the dataset appears (atomically) only when all are done.

Rows are split over data-parallel ranks in chunks of `--micro-batch` (world = TP x PP x DP; with
`--pp` the blocks are split over pipeline stages and decoded stage by stage, layers/decode.py); a
sampled chunk draws from its own generator seeded by (`--seed`, chunk), so the output does not
depend on TP, PP or DP. Reports tokens/s (generated tokens over the generation's wall time) on
stderr.

Exit codes (engine/entry.py): 0 done, 2 bad input (one `ConfigError: ...` line, or the error's own
kind, on stderr; nothing written).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import numpy as np
import torch

from engine import collectives as C
from engine.checkpoint import ResolvedCheckpoint, open_checkpoint
from engine.config import ConfigError, check, from_dict
from engine.data import (
    DataConfig,
    IndexedWriter,
    TokenBatches,
    document_text,
    dtype_for_vocab,
    file_records,
    find_eod_id,
    load_tokenizer,
    resolve_data_path,
)
from engine.entry import ensure_new_output, run_tool
from engine.log import get_logger, setup_logging
from engine.parallel import LaunchEnv, ParallelConfig, ParallelLayout
from layers.config import ModelConfig, saved_model_config
from layers.decode import Generated, Sampling, generate, left_pad
from layers.model import TransformerLM
from tools.score import add_model_args, check_tool_layout, load_model, read_tokens, save_npy, tool_degrees

log = get_logger("generate")
TOKENIZER_DIR = "tokenizer"  # inside an imported checkpoint's step directory (tools/convert_hf.py)
MASK_SUFFIX = "-generated"  # OUT_PREFIX-generated.{bin,idx}: 1 where a token was generated


# ------------------------------------------------------------------------------ generation

def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of one chunk of rows: a function of (seed, chunk) only."""
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1)[0])


def generate_chunk(model: TransformerLM, prompts: torch.Tensor, lengths: torch.Tensor, *,
                   chunk: int, args: argparse.Namespace, sampling: Sampling) -> Generated:
    """One chunk of rows, sampled from the chunk's own generator."""
    generator = torch.Generator(device=model.layout.device).manual_seed(chunk_seed(args.seed, chunk))
    return generate(model, prompts, prompt_lengths=lengths, max_new_tokens=args.max_new_tokens,
                    sampling=sampling, generator=generator, eos_id=args.eos_id)


def generate_rows(model: TransformerLM, prompts: torch.Tensor, lengths: torch.Tensor, *,
                  args: argparse.Namespace, sampling: Sampling, first_chunk: int = 0) -> Generated:
    """Every row's continuation on every rank: chunk c of `--micro-batch` rows (numbered from
    `first_chunk`) runs on DP rank c % dp, and the chunks are all-gathered over DP."""
    layout, mb = model.layout, args.micro_batch
    rows = prompts.shape[0]
    chunks = -(-rows // (mb * layout.dp)) * layout.dp  # a whole number of chunks per DP rank
    pad_rows = chunks * mb - rows
    prompts = torch.cat([prompts, prompts[:1].expand(pad_rows, -1)])
    lengths = torch.cat([lengths, lengths[:1].expand(pad_rows)])
    mine = [generate_chunk(model, prompts[c * mb:(c + 1) * mb], lengths[c * mb:(c + 1) * mb],
                           chunk=first_chunk + c, args=args, sampling=sampling)
            for c in range(layout.dp_rank, chunks, layout.dp)]
    tokens = _gather_chunks(torch.stack([g.tokens for g in mine]), layout)
    counts = _gather_chunks(torch.stack([g.lengths for g in mine]), layout)
    return Generated(tokens=tokens[:rows].cpu(), lengths=counts[:rows].cpu())


def _gather_chunks(local: torch.Tensor, layout: ParallelLayout) -> torch.Tensor:
    """`[chunks/dp, mb, ...]` of this DP rank (chunks r, r+dp, ...) -> `[chunks * mb, ...]` in order."""
    gathered = C.all_gather(local[None], layout.dp_group, dim=0)  # [dp, chunks/dp, mb, ...]
    return gathered.transpose(0, 1).flatten(0, 2)


# ------------------------------------------------------------------------------ prompts

def find_tokenizer(explicit: Path | None, step_dir: Path, run_config: dict) -> Path | None:
    """`--tokenizer`, else the imported checkpoint's, else the one beside the run's dataset."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError("--tokenizer", f"no such file: {explicit}")
        return explicit
    imported = step_dir / TOKENIZER_DIR / "tokenizer.json"
    if imported.is_file() or not isinstance(run_config.get("data"), dict):
        return imported if imported.is_file() else None
    data_cfg = from_dict(DataConfig, run_config["data"], prefix="--ckpt(data)")
    beside = [Path(prefix).parent / "tokenizer.json" for _, prefix in resolve_data_path(data_cfg)]
    return next((path for path in beside if path.is_file()), None)


def text_prompts(args: argparse.Namespace, tokenizer) -> tuple[list[str], list[torch.Tensor]]:
    """(texts, ids) of `--prompts`: one per non-blank line (or JSONL field)."""
    texts = [document_text(r) for r in file_records(args.prompts, per_line=True,
                                                    json_key=args.json_key)]
    ids = [torch.tensor(tokenizer.encode(t).ids, dtype=torch.int64) for t in texts]
    empty = [i for i, row in enumerate(ids) if len(row) == 0]
    check(not empty, "--prompts", f"prompt {empty[:1]} encodes to no tokens")
    return texts, ids


def data_batches(args: argparse.Namespace, run_config: dict) -> TokenBatches:
    """Training-like draws of `--prompt-len`-token prompts from the train split of `--data`."""
    saved = dict(run_config.get("data") or {})
    keep = {k: saved[k] for k in ("vocab_size", "cache_dir", "corpus_max_bytes") if k in saved}
    cfg = DataConfig(path=args.data, seq_len=args.prompt_len, micro_batch=args.micro_batch,
                     global_batch=args.micro_batch, split=args.split, **keep)
    return TokenBatches(cfg, seed=args.seed, split="train")


# ------------------------------------------------------------------------------ sequence-level KD

class SeqKDWriter:
    """Chunks of (prompts, continuations) under OUT_PREFIX.partial/, then the indexed datasets.
    `meta.json` there records what the chunks depend on: the arguments (`seq_kd_key`) and the
    checkpoint `--ckpt` resolved to (a directory of checkpoints moves on as training saves)."""

    def __init__(self, prefix: Path, key: dict, checkpoint: ResolvedCheckpoint):
        self.prefix, self.key = prefix, key
        self.source = {"path": str(checkpoint.path), "step": checkpoint.step,
                       "weights_sha256": checkpoint.weights_digest}
        self.staging = prefix.with_name(prefix.name + ".partial")

    def check_resumable(self) -> None:
        """Before any process group, on every rank: saved chunks resume only with the same
        arguments and the same weights (a `ConfigError` naming both checkpoints otherwise)."""
        meta = self.staging / "meta.json"
        if not meta.is_file():
            return
        saved = _read_json(meta)
        if saved.get("arguments") != self.key:
            raise ConfigError("--out", f"{self.staging} holds chunks of a run with other "
                                       "arguments (remove it, or rerun with the same arguments)")
        theirs = saved.get("checkpoint") or {}
        if [theirs.get(k) for k in ("step", "weights_sha256")] != \
                [self.source[k] for k in ("step", "weights_sha256")]:
            raise ConfigError("--ckpt", f"{self.staging} holds chunks generated from "
                                        f"{_describe(theirs)}, but --ckpt resolves to "
                                        f"{_describe(self.source)}: finish it with --ckpt "
                                        f"{theirs.get('path')}, or remove {self.staging}")

    def done_chunks(self) -> int:
        """Rank 0: chunks saved by an earlier run (`check_resumable` agreed); 0 for a fresh start."""
        meta = self.staging / "meta.json"
        if not meta.is_file():
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
            meta.write_text(json.dumps({"arguments": self.key, "checkpoint": self.source},
                                       sort_keys=True))
            return 0
        done = 0
        while (self.staging / f"chunk_{done:06d}.npz").is_file():
            done += 1
        return done

    def save(self, chunk: int, prompts: np.ndarray, tokens: np.ndarray, lengths: np.ndarray) -> None:
        path = self.staging / f"chunk_{chunk:06d}.npz"
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as handle:
            np.savez(handle, prompts=prompts, tokens=tokens, lengths=lengths)
        partial.replace(path)

    def finish(self, chunks: int, *, vocab_size: int, eod_id: int | None) -> tuple[int, int]:
        """Write OUT_PREFIX and its mask from the saved chunks; return (documents, tokens)."""
        dtype = dtype_for_vocab(vocab_size)
        with IndexedWriter(self.prefix, dtype) as docs, \
                IndexedWriter(f"{self.prefix}{MASK_SUFFIX}", np.uint8) as mask:
            for chunk in range(chunks):
                with np.load(self.staging / f"chunk_{chunk:06d}.npz", allow_pickle=False) as z:
                    for prompt, tokens, n in zip(z["prompts"], z["tokens"], z["lengths"]):
                        doc, generated = seq_kd_document(prompt, tokens[:n], eod_id)
                        docs.add(doc)
                        mask.add(generated)
        shutil.rmtree(self.staging)
        return len(docs), docs.num_tokens


def _read_json(path: Path) -> dict:
    """A dict, or {} when the file is not one (matching no key)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _describe(source: dict) -> str:
    digest = str(source.get("weights_sha256"))[:12]
    return f"{source.get('path')} (step {source.get('step')}, weights sha256 {digest}...)"


def seq_kd_document(prompt: np.ndarray, continuation: np.ndarray,
                    eod_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(prompt + continuation [+ end of document], 0/1 mask of the generated tokens)."""
    ended = eod_id is None or (len(continuation) > 0 and continuation[-1] == eod_id)
    tail = [] if ended else [eod_id]
    doc = np.concatenate([prompt, continuation, np.array(tail, dtype=np.int64)]).astype(np.int64)
    generated = np.zeros(len(doc), dtype=np.uint8)
    generated[len(prompt):len(prompt) + len(continuation)] = 1
    return doc, generated


def run_seq_kd(model: TransformerLM, args: argparse.Namespace, found: dict) -> None:
    layout, writer, run_config, sampling = (model.layout, found["writer"], found["run_config"],
                                            found["sampling"])
    done = torch.tensor([writer.done_chunks() if layout.is_rank0 else 0])
    done = int(C.broadcast(done, layout.role_group, src=0))
    batches, chunks = data_batches(args, run_config), -(-args.num_prompts // args.micro_batch)
    began, generated = time.perf_counter(), 0
    for first in range(0, chunks, layout.dp):
        draws = [batches.next_step()[0]["input_ids"] for _ in range(first, min(first + layout.dp, chunks))]
        if first + len(draws) <= done:
            continue
        prompts = torch.cat(draws)[:args.num_prompts - first * args.micro_batch]
        out = generate_rows(model, prompts, torch.full((len(prompts),), args.prompt_len),
                            args=args, sampling=sampling, first_chunk=first)
        generated += int(out.lengths.sum())
        if layout.is_rank0:
            for i in range(len(draws)):
                rows = slice(i * args.micro_batch, (i + 1) * args.micro_batch)
                writer.save(first + i, prompts[rows].numpy(), out.tokens[rows].numpy(),
                            out.lengths[rows].numpy())
    report_speed(generated, time.perf_counter() - began, layout)
    if layout.is_rank0:
        documents, tokens = writer.finish(chunks, vocab_size=model.config.vocab_size,
                                          eod_id=args.eos_id)
        log.info("wrote %d documents (%d tokens) to %s.{bin,idx} and its mask %s%s",
                 documents, tokens, args.out, args.out, MASK_SUFFIX)
    C.barrier(layout.role_group)


def seq_kd_key(args: argparse.Namespace) -> dict:
    """The arguments the saved chunks depend on: a resumed run must agree on all of them (and
    on the checkpoint: `SeqKDWriter`)."""
    return {key: str(getattr(args, key)) for key in
            ("data", "num_prompts", "prompt_len", "max_new_tokens", "micro_batch", "seed",
             "split", "greedy", "temperature", "top_k", "top_p", "eos_id")}


# ------------------------------------------------------------------------------ command line

def report_speed(tokens: int, seconds: float, layout: ParallelLayout) -> None:
    if layout.is_rank0:
        log.info("generated %d tokens in %.2f s: %.1f tokens/s (tp=%d, %sdp=%d)", tokens,
                 seconds, tokens / max(seconds, 1e-9), layout.tp,
                 f"pp={layout.pp}, " if layout.pp > 1 else "", layout.dp)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", type=Path, help=".npy of int prompt ids [batch, prompt_len]")
    source.add_argument("--prompts", type=Path, help="text file: one prompt per non-blank line")
    source.add_argument("--data", help="indexed-dataset prefix (or `default`): sequence-level KD")
    parser.add_argument("--json-key", help="with --prompts: the file is JSONL, prompts in this field")
    parser.add_argument("--out", type=Path, help="OUT.npy (ids), OUT.jsonl (text), or with --data "
                                                 "the output dataset prefix")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--max-new-tokens", type=int, required=True, help="tokens to generate per row")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    parser.add_argument("--temperature", type=float, default=None, help="sample at this temperature")
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely")
    parser.add_argument("--top-p", type=float, default=None, help="sample within this nucleus mass")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (and --data's draws)")
    parser.add_argument("--eos-id", type=int, default=None, help="end-of-sequence id (text and "
                                                                 "--data default: the tokenizer's)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the checkpoint's)")
    parser.add_argument("--micro-batch", type=int, default=8, help="rows per generate call on a DP rank")
    parser.add_argument("--num-prompts", type=int, default=64, help="with --data: prompts to continue")
    parser.add_argument("--prompt-len", type=int, default=32, help="with --data: tokens per prompt")
    parser.add_argument("--split", default="98,2", help="with --data: train,valid document split")
    return parser.parse_args(argv)


def sampling_of(args: argparse.Namespace) -> Sampling:
    sampled = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.greedy and sampled:
        raise ConfigError("--greedy", "excludes --temperature, --top-k and --top-p")
    if not sampled:
        return Sampling(greedy=True)
    try:
        return Sampling(temperature=1.0 if args.temperature is None else args.temperature,
                        top_k=args.top_k, top_p=args.top_p)
    except ConfigError as err:
        raise ConfigError("--" + err.key.replace("_", "-"), err.message) from None


def _check_args(args: argparse.Namespace, cfg: ModelConfig, world: int) -> None:
    """Every check that needs no process group (run identically on every rank)."""
    check_tool_layout(args, cfg, world)
    for key in ("max_new_tokens", "micro_batch", "num_prompts", "prompt_len"):
        check(getattr(args, key) >= 1, "--" + key.replace("_", "-"),
              f"must be >= 1 (got {getattr(args, key)})")
    check(args.eos_id is None or 0 <= args.eos_id < cfg.vocab_size, "--eos-id",
          f"must be in [0, {cfg.vocab_size}) (got {args.eos_id})")
    check(args.json_key is None or args.prompts is not None, "--json-key", "needs --prompts")
    if args.data is not None:
        check(args.out is not None, "--out", "is required with --data (the dataset prefix)")
        check(args.prompt_len + args.max_new_tokens <= cfg.max_seq_len, "--max-new-tokens",
              f"--prompt-len {args.prompt_len} + {args.max_new_tokens} exceeds "
              f"model.max_seq_len={cfg.max_seq_len}")
        for suffix in (".bin", f"{MASK_SUFFIX}.bin"):
            ensure_new_output(Path(f"{args.out}{suffix}"), force=args.force)
    elif args.out is not None:
        check(args.out.suffix in (".npy", ".jsonl"), "--out", f"must end in .npy or .jsonl "
                                                              f"(got {args.out.name})")
        ensure_new_output(args.out, force=args.force)


def prepare_inputs(args: argparse.Namespace, world: int) -> dict:
    """Everything read and checked before any process group exists."""
    checkpoint = open_checkpoint(args.ckpt, key="--ckpt")
    step_dir, run_config, cfg = checkpoint.path, checkpoint.run_config, saved_model_config(checkpoint)
    _check_args(args, cfg, world)
    sampling = sampling_of(args)
    needs_text = args.prompts is not None
    ids_only = args.tokens is not None and args.out is not None and args.out.suffix == ".npy"
    tokenizer_path = None if ids_only and args.tokenizer is None else \
        find_tokenizer(args.tokenizer, step_dir, run_config)
    tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path is not None else None
    check(tokenizer is not None or not needs_text, "--tokenizer",
          f"{step_dir} records no tokenizer; pass --tokenizer tokenizer.json")
    if args.eos_id is None and tokenizer is not None and args.tokens is None:
        args.eos_id = _tokenizer_eos(tokenizer)
    found = dict(step_dir=step_dir, run_config=run_config, cfg=cfg, sampling=sampling,
                 tokenizer=tokenizer, texts=None)
    if args.tokens is not None:
        ids = read_tokens(args.tokens, cfg, min_seq=1)
        found.update(prompts=ids, lengths=torch.full((ids.shape[0],), ids.shape[1]))
    elif args.prompts is not None:
        texts, rows = text_prompts(args, tokenizer)
        prompts, lengths = left_pad(rows)
        check(prompts.shape[1] + args.max_new_tokens <= cfg.max_seq_len, "--max-new-tokens",
              f"the longest prompt ({prompts.shape[1]} tokens) + {args.max_new_tokens} exceeds "
              f"model.max_seq_len={cfg.max_seq_len}")
        found.update(prompts=prompts, lengths=lengths, texts=texts)
    if args.data is not None:
        found["writer"] = SeqKDWriter(args.out, seq_kd_key(args), checkpoint)
        found["writer"].check_resumable()
    if args.tokens is not None:
        check(found["prompts"].shape[1] + args.max_new_tokens <= cfg.max_seq_len,
              "--max-new-tokens", f"prompt length {found['prompts'].shape[1]} + "
                                  f"{args.max_new_tokens} exceeds model.max_seq_len={cfg.max_seq_len}")
    return found


def _tokenizer_eos(tokenizer) -> int | None:
    try:
        return find_eod_id(tokenizer)
    except ValueError:  # DataError: no known end-of-document token
        return None


def write_outputs(args: argparse.Namespace, found: dict, out: Generated) -> None:
    """OUT.npy, OUT.jsonl, or the completions on stdout (rank 0 only)."""
    if args.out is not None and args.out.suffix == ".npy":
        save_npy(args.out, out.tokens.numpy())
        log.info("wrote generated ids %s to %s", list(out.tokens.shape), args.out)
        return
    lines = []
    for row, (ids, n) in enumerate(zip(out.tokens.tolist(), out.lengths.tolist())):
        ids = ids[:n - 1] if args.eos_id is not None and n and ids[n - 1] == args.eos_id else ids[:n]
        item = {"prompt": found["texts"][row] if found["texts"] else
                found["prompts"][row].tolist(), "ids": ids}
        if found["tokenizer"] is not None:
            item["completion"] = found["tokenizer"].decode(ids)
        lines.append(item)
    if args.out is None:
        for item in lines:
            print(item.get("completion", item["ids"]), flush=True)
        return
    text = "".join(json.dumps(item) + "\n" for item in lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(f".{args.out.name}.partial")
    partial.write_text(text)
    partial.replace(args.out)
    log.info("wrote %d completions to %s", len(lines), args.out)


def run(args: argparse.Namespace, found: dict, layout: ParallelLayout) -> None:
    model = load_model(found["step_dir"], found["cfg"], layout)
    if args.data is not None:
        run_seq_kd(model, args, found)
        return
    began = time.perf_counter()
    out = generate_rows(model, found["prompts"], found["lengths"], args=args,
                        sampling=found["sampling"])
    report_speed(int(out.lengths.sum()), time.perf_counter() - began, layout)
    if layout.is_rank0:
        write_outputs(args, found, out)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = parse_args(argv)

    def prepare(launch: LaunchEnv) -> tuple[ParallelConfig, Callable[[ParallelLayout], None]]:
        degrees = tool_degrees(args, launch.world_size)
        found = prepare_inputs(args, launch.world_size)
        return degrees, lambda layout: run(args, found, layout)

    return run_tool(prepare)


if __name__ == "__main__":
    sys.exit(main())
