"""What a run shows: metrics.jsonl, TensorBoard, curves.png, and a watch for DINO's two collapses.

The paper's collapse study (its section 5.3): with centering alone the teacher's output tends to uniform
(entropy -> log K); with sharpening alone it tends to one prototype (entropy -> 0). In both, the student
copies the teacher exactly: KL(teacher || student) -> 0. A learning run keeps that KL away from 0.
"""
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist


@torch.no_grad()
def teacher_stats(p: torch.Tensor) -> dict:
    """Mean per-sample entropy of the teacher's centred, sharpened distribution `p` (B, K), and the entropy
    of its batch mean (how many prototypes are in use), both in nats."""
    logp = torch.log(p.clamp_min(1e-30))
    mean_p = p.mean(0)
    if dist.is_available() and dist.is_initialized():  # the mean over the global batch, not this share
        dist.all_reduce(mean_p)
        mean_p /= dist.get_world_size()
    return {"teacher_entropy": float(-(p * logp).sum(-1).mean()),
            "batch_entropy": float(-(mean_p * torch.log(mean_p.clamp_min(1e-30))).sum())}


class CollapseWatch:
    """Warns once per kind when the last `patience` logged steps all look collapsed."""

    def __init__(self, out_dim: int, patience: int = 20, kl_floor: float = 1e-3, knn_falls: int = 3):
        self.log_k, self.patience, self.kl_floor = math.log(out_dim), patience, kl_floor
        self.history: list[str | None] = []
        self.warned: set[str] = set()
        self.knn_falls = knn_falls
        self.knn: list[float] = []

    def update_knn(self, top1: float) -> str | None:
        """A k-NN check's top-1: a warning when it has fallen `knn_falls` checks in a row (once per fall)."""
        self.knn.append(top1)
        recent = self.knn[-self.knn_falls - 1:]
        falling = len(recent) == self.knn_falls + 1 and all(b < a for a, b in zip(recent, recent[1:]))
        if not falling:
            self.warned.discard("knn")  # a later fall is warned about again
            return None
        if "knn" in self.warned:
            return None
        self.warned.add("knn")
        return (f"collapse warning: k-NN top-1 fell {self.knn_falls} checks in a row "
                f"({' -> '.join(f'{v:.1f}' for v in recent)}%). The features are getting worse: lower lr, "
                "raise the teacher momentum, or stop at checkpoint.best.pt.")

    def kind(self, m: dict) -> str | None:
        if m["kl"] > self.kl_floor * self.log_k:
            return None
        if m["teacher_entropy"] > 0.9 * self.log_k:
            return "uniform"
        if m["batch_entropy"] < 0.1 * self.log_k:
            return "one-prototype"
        return None

    def update(self, metrics: dict) -> str | None:
        self.history = (self.history + [self.kind(metrics)])[-self.patience:]
        kind = self.history[0]
        if kind is None or len(self.history) < self.patience or any(h != kind for h in self.history):
            return None
        if kind in self.warned:
            return None
        self.warned.add(kind)
        if kind == "uniform":
            return ("collapse warning: the teacher's output is nearly uniform (entropy "
                    f"{metrics['teacher_entropy']:.2f} of max {self.log_k:.2f}) and the student copies it "
                    "(KL ~ 0). Centering dominates sharpening: lower teacher_temp (e.g. 0.04) or "
                    "warmup_teacher_temp, raise center_momentum, or lower lr.")
        return ("collapse warning: the teacher puts (almost) every image on the same prototype (batch entropy "
                f"{metrics['batch_entropy']:.2f} of max {self.log_k:.2f}) and the student copies it (KL ~ 0). "
                "Sharpening dominates centering: lower center_momentum or raise teacher_temp; lower lr; "
                "keep norm_last_layer true; check that the teacher momentum is not too low.")


class MetricsLog:
    """metrics.jsonl plus TensorBoard events (when tensorboard is installed), in the run folder."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:
                pass

    def write(self, metrics: dict):
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, metrics["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def drop_metrics_after(path: Path, step: int):
    """On resume, forget the rows of steps after the checkpoint (a crash leaves them, and they run again)
    and a half-written last line."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()

    def keep(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            return False
    kept = [line for line in lines if keep(line)]
    if len(kept) < len(lines):
        path.with_suffix(".tmp").write_text("".join(line + "\n" for line in kept))
        os.replace(path.with_suffix(".tmp"), path)


class SkippedFiles:
    """skipped.txt: each file that could not be used, once, with its reason (kept across resumes)."""

    def __init__(self, run_dir: Path, log, enabled: bool = True):
        self.path, self.log, self.enabled = Path(run_dir) / "skipped.txt", log, enabled
        self.reported = {line.split("\t")[0] for line in self.path.read_text().splitlines()} \
            if self.path.exists() else set()

    def report(self, skipped: list[tuple[str, str]]):
        for path, reason in skipped:
            if path not in self.reported and self.enabled:
                self.reported.add(path)
                with open(self.path, "a") as f:
                    f.write(f"{path}\t{reason}\n")
                self.log(f"skipped {path}: {reason}")

    def __len__(self):
        return len(self.reported)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


DINO_PANELS = [("loss", "loss"), ("kl", "KL(teacher || student)"), ("teacher_entropy", "teacher entropy"),
               ("batch_entropy", "batch-mean entropy"), ("lr", "learning rate"), ("momentum", "teacher momentum"),
               ("teacher_temp", "teacher temperature"), ("images_per_s", "images / s")]
KNN_PANELS = [("knn_top1", "k-NN top-1 (%), teacher"), ("knn_top1_student", "k-NN top-1 (%), student")]


def plot_curves(run_dir: Path, out: Path | None = None, panels: list[tuple[str, str]] = DINO_PANELS,
                title: str = "DINO training") -> Path | None:
    """curves.png: one panel per (metrics key, panel title) of `panels` against the step, four to a row."""
    rows = read_metrics(run_dir)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = -(-len(panels) // 4)
    fig, axes = plt.subplots(lines, 4, figsize=(16, 3.25 * lines), squeeze=False)
    for ax, (key, panel_title) in zip(axes.flat, panels):
        points = [(r["step"], r[key]) for r in rows if key in r]  # rows of other kinds leave no gap
        ax.plot([p[0] for p in points], [p[1] for p in points], lw=1.2, marker="." if len(points) < 50 else None)
        ax.set_title(panel_title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {Path(run_dir).name}")
    fig.tight_layout()
    out = Path(out or Path(run_dir) / "curves.png")
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
