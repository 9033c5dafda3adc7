"""`make bench`: every benchmark table in tools/bench/, one after another, in one process tree.

    python tools/bench/run_all.py [--quick]

Each benchmark prints its own markdown table with the ratio against the baseline measured in the
same run. `--quick` uses smaller sizes (a smoke run, not the README numbers).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "model.py": [],
    "generate.py": [],
    "kd_loss.py": ["--vocab", "65536", "131072", "--tp", "1", "2"],
    "schedule.py": [],
    "on_policy.py": [],
    "teachers.py": [],
    "memory.py": [],
    "pipeline.py": [],
    "offline_store.py": [],
    "plan.py": [],
    "moe.py": [],
    "context_parallel.py": [],
}
QUICK = {
    "model.py": ["--layers", "2", "--hidden", "128", "--steps", "2", "--warmup", "1"],
    "generate.py": ["--layers", "2", "--hidden", "128", "--heads", "4", "--kv-heads", "2",
                    "--vocab", "2048", "--new-tokens", "4", "--repeats", "1"],
    "kd_loss.py": ["--tokens", "256", "--vocab", "4096", "--tp", "1", "--repeats", "1"],
    "schedule.py": ["--steps", "6", "--warmup", "2"],
    "on_policy.py": ["--teacher-steps", "20", "--student-steps", "10", "--eval-prompts", "8",
                     "--out", "runs/bench_on_policy_quick"],
    "teachers.py": ["--teacher-steps", "10", "--student-steps", "5", "--eval-batches", "2",
                    "--out", "runs/bench_teachers_quick"],
    "memory.py": ["--layers", "2", "--hidden", "64", "--vocab", "512", "--seq", "64", "--batch", "2",
                  "--steps", "1", "--dp", "1", "2"],
    "pipeline.py": ["--pp", "2", "--micro-batches", "4", "--forward-ms", "5", "--repeats", "1"],
    "offline_store.py": ["--teacher-steps", "5", "--out", "runs/bench_offline_store_quick"],
    "plan.py": ["--out", "runs/bench_plan_quick"],
    "moe.py": ["--hidden", "64", "--expert-ffn", "128", "--tokens", "256", "--steps", "1"],
    "context_parallel.py": ["--seq", "1024", "--cp", "1", "2"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    args = parser.parse_args(argv)
    failed = []
    for script, extra in (QUICK if args.quick else FULL).items():
        print(f"\n## {script} {' '.join(extra)}\n", flush=True)
        if subprocess.run([sys.executable, str(HERE / script), *extra]).returncode != 0:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
