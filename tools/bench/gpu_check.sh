#!/usr/bin/env bash
# The GPU check: everything a lent single-GPU machine should tell us, in one call of under 8 minutes.
#
#   bash tools/bench/gpu_check.sh [OUT_DIR]        # on the GPU machine, from anywhere
#   DEVICE=cpu bash tools/bench/gpu_check.sh        # the same steps on the CPU at tiny sizes: checks
#                                                   # the script itself where no GPU is lent
#
# Steps (each with its own time limit; a failing step is reported and the next one runs):
#   1. the machine: GPU, driver, torch and its CUDA;
#   2. the CUDA tests (tests/test_cuda.py: CUDA training equals the CPU run, bf16 autocast, NCCL);
#   3. the real entry point under torchrun on an NCCL world of one rank (parallel.backend=nccl):
#      the demo teacher trained briefly, then distilled into the demo student in bf16, with and
#      without the fused LM-head loss; tokens/s and losses from metrics.jsonl;
#   4. tools/bench/kd_loss.py on the GPU in bf16 (naive vs ours, peak memory and time);
#   5. tools/bench/model.py on the GPU in bf16 (forward+backward against transformers);
#   6. tools/bench/generate.py on the GPU in bf16 (decoding against transformers' generate).
# Logs go to OUT_DIR (default: $OUT on the device machine, else a new temporary folder); the last
# lines printed are one table: step, status, seconds, and the step's headline numbers.
# Uses the machine's python3 (PYTHON=... to override) and installs nothing.

set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LOGS=${1:-${OUT:-$(mktemp -d)}}
WORK=$(mktemp -d)
mkdir -p "$LOGS"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
declare -a SUMMARY

if [[ $DEVICE == cuda ]]; then
    BF16=true; DTYPE=bf16
    KD_SIZES=(--tokens 8192 --vocab 131072 262144 --hidden 2048 --repeats 3)
    MODEL_SIZES=(--layers 8 --hidden 1024 --heads 16 --kv-heads 4 --ffn 2816 --seq 1024 --batch 8 --steps 10)
    GEN_SIZES=(--prompts 8 --new-tokens 64 --repeats 3)
    TRAIN_STEPS=60; LIMIT=150
else
    BF16=false; DTYPE=fp32
    KD_SIZES=(--tokens 128 --vocab 4096 --hidden 64 --repeats 1 --threads 1)
    MODEL_SIZES=(--layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 --vocab 512 --seq 32 --steps 1)
    GEN_SIZES=(--layers 2 --hidden 64 --heads 4 --kv-heads 2 --ffn 128 --vocab 512 --new-tokens 4 --repeats 1)
    TRAIN_STEPS=4; LIMIT=300
fi

# step NAME HEADLINE_PATTERN COMMAND...: run with a time limit, log to $LOGS/NAME.log, keep the
# last line matching HEADLINE_PATTERN for the table.
step() {
    local name=$1 pattern=$2; shift 2
    local start=$SECONDS status headline
    echo "== $name: $*"
    if timeout "$LIMIT" "$@" >"$LOGS/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; fi
    headline=$(grep -E "$pattern" "$LOGS/$name.log" | tail -n 1 | cut -c1-160)
    [[ $status == ok ]] || tail -n 15 "$LOGS/$name.log"
    SUMMARY+=("| $name | $status | $((SECONDS - start)) | ${headline//|/\/} |")
}

# metrics RUN_DIR: the last logged step's loss terms and throughput, one line.
metrics() {
    "$PY" - "$1" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/metrics.jsonl") if '"loss"' in line]
last = rows[-1]
rates = sorted(r["tokens_per_s"] for r in rows[len(rows) // 2:])
print(f"step {last['step']}: loss {last['loss']:.4f} lm {last['lm_loss']:.4f} kd {last['kd_loss']:.4f}"
      f" act {last['act_loss']:.4f}; tokens/s (median of the second half) {rates[len(rates) // 2]:.0f}")
EOF
}

entry_point() {  # the teacher, then the student distilled from it on an NCCL world of one rank
    local extra=("parallel.tp=1" "parallel.sp=false" "train.steps=$TRAIN_STEPS" "train.bf16=$BF16"
                 "train.eval_interval=0" "parallel.backend=$([[ $DEVICE == cuda ]] && echo nccl || echo gloo)")
    "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 launch/pretrain.py \
        --config launch/configs/demo_teacher.yaml "${extra[@]}" "train.run_dir=$WORK/teacher" || return 1
    for fused in false true; do
        "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 launch/pretrain_distill.py \
            --config launch/configs/demo.yaml "${extra[@]}" "distill.fused_lm_head=$fused" \
            "distill.teacher=$WORK/teacher/checkpoints" "train.run_dir=$WORK/student_$fused" || return 1
        echo "fused_lm_head=$fused: $(metrics "$WORK/student_$fused")"
    done
}

step machine "torch" bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1;
    $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())'"
if [[ $DEVICE == cuda ]]; then
    step cuda_tests "passed|failed|error" "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
fi
export -f entry_point metrics  # `timeout` runs commands, not shell functions: a child bash runs it
export PY DEVICE BF16 TRAIN_STEPS WORK
step entry_point "fused_lm_head=true" bash -c entry_point
step kd_loss "fused peak" "$PY" tools/bench/kd_loss.py --device "$DEVICE" --dtype "$DTYPE" --tp 1 "${KD_SIZES[@]}"
step model "ratio" "$PY" tools/bench/model.py --device "$DEVICE" --dtype "$DTYPE" "${MODEL_SIZES[@]}"
step generate "ratio" "$PY" tools/bench/generate.py --device "$DEVICE" --dtype "$DTYPE" "${GEN_SIZES[@]}"

echo
echo "GPU check ($DEVICE), logs in $LOGS"
echo "| step | status | seconds | headline |"
echo "|---|---|---:|---|"
printf '%s\n' "${SUMMARY[@]}"
for log in "$LOGS"/kd_loss.log "$LOGS"/model.log "$LOGS"/generate.log; do
    [[ -f $log ]] && { echo; grep -E '^\||^T=|^model:|ratio|PASS|FAIL' "$log"; }
done
rm -rf "$WORK"
