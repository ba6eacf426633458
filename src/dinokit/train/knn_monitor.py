"""k-NN accuracy while training: the number DINO's maintainers tune with, rather than the loss.

Every so often (steps or minutes) the teacher's backbone (and, if asked, the student's) embeds a fixed,
seeded subset of a labelled training source and of a labelled test source the way `dinokit knn` does, and
the weighted k-NN (k = 20, T = 0.07) of the test subset is written to the run's metrics. The run keeps
`checkpoint.best.pt` by that number. The check leaves training exactly as it was: models back in their
mode, the global random state restored, so a run with the monitor trains the same weights as one without.
"""
import re
import time

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sources import open_source
from ..eval.common import transform_for
from ..eval.features import extract_features
from ..eval.knn import knn_classify


class Subset:
    """A fixed, seeded subset of a labelled source, readable like a source."""

    def __init__(self, source, size: int, seed: int):
        if source.labels is None:
            raise ValueError(f"{source.name} has no labels: the k-NN monitor needs class sub-folders "
                             "(or a labelled data set such as fashion-mnist:test)")
        picked = np.sort(np.random.default_rng(seed).permutation(len(source))[:size])
        self.source, self.indices = source, picked.tolist()
        self.name = f"{source.name}[{len(self.indices)} of {len(source)}]"
        self.paths = [source.paths[i] for i in self.indices]
        self.labels = [source.labels[i] for i in self.indices]
        self.classes = source.classes

    def __len__(self):
        return len(self.indices)

    def read(self, i: int) -> torch.Tensor:
        return self.source.read(self.indices[i])


def parse_every(text: str) -> tuple[int | None, float | None]:
    """'500' (steps) or '5m' / '90s' / '1h' (time) -> (steps, seconds)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--monitor-every takes a number of steps (500) or a time (5m, 90s, 1h), not {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    if not unit:
        if not value.is_integer():
            raise ValueError(f"--monitor-every {text}: a number of steps is a whole number")
        return int(value), None
    return None, value * {"s": 1, "m": 60, "h": 3600}[unit]


class KnnMonitor:
    """Checks k-NN top-1 every `every` ('500' steps, or '5m'), on `subset` images of each source.

    >>> monitor = KnnMonitor("fashion-mnist:train", "fashion-mnist:test", every="1000")  # doctest: +SKIP
    >>> train(cfg, "runs/x", monitor=monitor)  # metrics.jsonl gains knn_top1; checkpoint.best.pt  # doctest: +SKIP
    """

    def __init__(self, train_source: str, test_source: str, every: str = "1000", subset: int = 2000,
                 k: int = 20, temperature: float = 0.07, student: bool = False, seed: int = 0,
                 batch_size: int = 256):
        if subset < k:
            raise ValueError(f"--monitor-subset must be at least k = {k} (got {subset})")
        self.train_spec, self.test_spec = train_source, test_source
        train, test = open_source(train_source), open_source(test_source)  # errors now, before training
        self.train, self.test = Subset(train, subset, seed), Subset(test, subset, seed + 1)
        missing = sorted(set(self.test.classes) - set(self.train.classes)) if self.test.classes else []
        if missing:
            raise ValueError(f"{test.name} has classes the monitor's training source lacks: {', '.join(missing[:5])}")
        self.every_steps, self.every_seconds = parse_every(every)
        self.k, self.temperature, self.student, self.batch_size = k, temperature, student, batch_size
        self.last_step, self.last_time = None, time.time()
        self.best = -1.0

    def due(self, step: int, final: bool = False) -> bool:
        """Whether to check now: every `every`, and at the run's last step."""
        if step == self.last_step:
            return False
        if final:
            return True
        if self.every_steps is not None:
            return step % self.every_steps == 0
        return time.time() - self.last_time >= self.every_seconds

    def labels(self, subset: Subset, kept: list[int]) -> torch.Tensor:
        index = {c: i for i, c in enumerate(self.train.classes)}
        if subset.classes == self.train.classes or not subset.classes:
            return torch.tensor([subset.labels[i] for i in kept])
        return torch.tensor([index[subset.classes[subset.labels[i]]] for i in kept])

    @torch.no_grad()
    def accuracy(self, backbone: torch.nn.Module, device: torch.device) -> float:
        """k-NN top-1 (percent) of `backbone`'s [CLS] features, evaluated as `dinokit knn` evaluates."""
        was_training = backbone.training
        try:
            transform = transform_for(backbone)
            feats = [extract_features(backbone, s, self.batch_size, device, transform=transform, progress=False)
                     for s in (self.train, self.test)]
        finally:
            backbone.train(was_training)
        (train_f, train_kept, _), (test_f, test_kept, _) = feats
        top1, _ = knn_classify(F.normalize(train_f, dim=1), self.labels(self.train, train_kept),
                               F.normalize(test_f, dim=1), self.labels(self.test, test_kept), self.k,
                               self.temperature, len(self.train.classes) or None)
        return top1

    def check(self, trainer) -> dict:
        """The metrics row of a check at the trainer's step; the global random state is left as it was."""
        rng = torch.get_rng_state()
        started = time.perf_counter()
        row = {"knn_top1": self.accuracy(trainer.teacher.backbone, trainer.device)}
        if self.student:
            row["knn_top1_student"] = self.accuracy(trainer.student.backbone, trainer.device)
        torch.set_rng_state(rng)
        row["knn_seconds"] = time.perf_counter() - started
        self.last_step, self.last_time = trainer.step, time.time()
        return row

    def is_best(self, row: dict) -> bool:
        if row["knn_top1"] > self.best:
            self.best = row["knn_top1"]
            return True
        return False

    def resume(self, rows: list[dict]):
        """On resume: the best k-NN of the checks logged before the checkpoint."""
        self.best = max([r["knn_top1"] for r in rows if "knn_top1" in r], default=-1.0)
