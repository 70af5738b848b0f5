"""Run observability: metrics.csv and TensorBoard events in RUN_DIR, and a PNG plot of a run's curves."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from llmlab.errors import LLMLabError

COLUMNS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens", "tokens_per_s", "elapsed_s"]
METRICS_FILE = "metrics.csv"


class RunLogger:
    """Appends one row per logged step to RUN_DIR/metrics.csv and the same scalars to RUN_DIR/tensorboard.

    On resume from step k the rows after k (written by the interrupted run past its last checkpoint) are
    dropped, so the file reads as one uninterrupted run; the file is rewritten into a temporary sibling and renamed
    over the old one, so a kill at that moment leaves the old file, never a truncated one. A logger with
    `enabled=False` (ranks other than 0) does nothing.
    """

    def __init__(self, run_dir: Path, enabled: bool = True, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        rows = read_metrics(run_dir) if resume_step is not None and self.path.is_file() else []
        tmp = run_dir / f".{METRICS_FILE}.tmp-{os.getpid()}"  # swept by the next run if a kill leaves it
        try:
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, COLUMNS)
                writer.writeheader()
                writer.writerows({k: _fmt(r.get(k)) for k in COLUMNS} for r in rows if r["step"] <= resume_step)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        from torch.utils.tensorboard import SummaryWriter  # here, not on top: it takes seconds to import

        self.tb = SummaryWriter(str(run_dir / "tensorboard"),
                                purge_step=None if resume_step is None else resume_step + 1)

    def log(self, step: int, **values: float | int | None) -> None:
        if not self.enabled:
            return
        with self.path.open("a", newline="") as fh:
            csv.DictWriter(fh, COLUMNS).writerow({"step": step, **{k: _fmt(values.get(k)) for k in COLUMNS[1:]}})
        for key, value in values.items():
            if value is not None:
                tag = "val/loss" if key == "val_loss" else f"train/{key}"
                self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else value  # full precision: curves compare exactly


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of RUN_DIR/metrics.csv as dicts of numbers (None where a row has no value)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise LLMLabError(f"{run_dir}: no {METRICS_FILE} (is it a training run folder?)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise LLMLabError(f"{path}: not a metrics file (no 'step' column)")
        rows = []
        for row in reader:
            parsed = {k: (float(v) if v not in ("", None) else None) for k, v in row.items() if k}
            parsed["step"] = int(parsed["step"])
            rows.append(parsed)
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a PNG of train/validation loss and the learning rate over steps; returns its path."""
    import matplotlib  # here, not on top: only `llmlab plot` needs it, and it is slow to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    if not rows:
        raise LLMLabError(f"{run_dir / METRICS_FILE} has no rows yet")

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(*series("loss"), label="train", linewidth=1)
    ax_loss.plot(*series("val_loss"), "o-", label="validation", markersize=3)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_title(f"{run_dir.resolve().name}")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot(*series("lr"), color="tab:green", linewidth=1)
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out) if out is not None else run_dir / "loss.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
