"""Plot the loss curves of one or more runs.

    python tools/plot_metrics.py RUN_DIR... --out FILE.png [--keys loss,lm_loss,val_loss]

Each RUN_DIR holds a `metrics.jsonl`; one panel per key, one line per run (labelled by the run
directory's name). `--keys diagnostics` stands for the KD diagnostics (teacher_entropy,
student_entropy, top1_agreement); group names and keys mix (`--keys val_loss,diagnostics`). A key
a run logs per teacher (`kd_loss/<name>`, ...) is drawn once per teacher.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from engine.metrics import read_metrics  # noqa: E402


def run_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    return read_metrics(path)


# Names that stand for several keys in --keys.
GROUPS = {"diagnostics": ["teacher_entropy", "student_entropy", "top1_agreement"]}
# The unit of a key's panel (nats per token unless listed).
UNITS = {"top1_agreement": "fraction of tokens", "temperature": "temperature",
         "lr": "learning rate", "tokens_per_s": "tokens / s"}


def expand_keys(keys: list[str]) -> list[str]:
    """`keys` with group names replaced by their keys, in order, without repeats."""
    out: list[str] = []
    for key in keys:
        out += [k for k in GROUPS.get(key, [key]) if k not in out]
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def variants(records: list[dict], key: str) -> list[str]:
    """`key` if the records hold it, else its per-teacher forms `key/<name>` (several teachers
    log `kd_loss/<name>`, `teacher_entropy/<name>`, `top1_agreement/<name>`)."""
    present = {k for r in records for k, v in r.items() if v is not None}
    if key in present:
        return [key]
    return sorted(k for k in present if k.startswith(key + "/"))


def plot(run_dirs: list[Path], keys: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {d.name: run_metrics(d) for d in run_dirs}
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, records in runs.items():
            for found in variants(records, key):
                steps, values = series(records, found)
                label = name if found == key else f"{name} {found[len(key) + 1:]}"
                ax.plot(steps, values, label=label, marker="o" if len(values) < 12 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(UNITS.get(key, "nats / token"))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with metrics.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument("--keys", default="lm_loss,val_loss", help="comma-separated metric keys")
    args = parser.parse_args(argv)
    try:
        plot(args.runs, expand_keys([k for k in args.keys.split(",") if k]), args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
