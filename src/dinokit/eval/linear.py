"""`dinokit linear`: a linear classifier on frozen features (the paper's linear probe).

Features, as the paper's `eval_linear.py` builds them: [CLS] of the last n blocks concatenated (the paper uses
n = 4 for ViT-S; the default here is min(4, depth)), optionally with the last block's averaged patch tokens
(the paper's ViT-B setting). One linear layer, trained the paper's way: SGD momentum 0.9, batch 256, a
per-epoch cosine from the learning rate to 0 over 100 epochs, no weight decay.

Two defaults go beyond the paper's so that the probe converges whatever the features' scale
(`--lr 0.001 --no-standardize` is the paper's protocol exactly):
- the features are standardised per dimension with the training features' mean and standard deviation (a
  BatchNorm without affine parameters in front of the layer, as MAE's probe has);
- the learning rate is chosen from `LR_GRID` by top-1 on a held-out 10% of the training features (all the
  grid's rates train at once, as independent heads), then the probe is retrained on all the training features
  at that rate. The test set is used only for the final evaluation.

Fast path (default): the features of centre-cropped images are computed once (and cached); the classifier
trains on them. `--augment`: the paper's protocol, fresh RandomResizedCrop + flip features every epoch (the
standardisation statistics and the rate selection come from the centre-crop features)."""
import contextlib
import math
import random
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from torchvision.transforms import v2
from tqdm import tqdm

from ..data.sources import open_source
from ..device import pick_device
from .common import (Pixels, add_common_args, cached_features, load_model, log, report, transform_for,
                     weights_id)
from .features import cls_features, eval_transform, extract_features, last_blocks_features
from .knn import topk_accuracy
from .knn_command import labels_for

# Base learning rates (per 256 samples) that `--lr auto` chooses from: they span the best rates measured
# for standardised features of trained models and of raw pixels (BENCHMARKS.md).
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
HOLDOUT = 0.1  # share of the training features that `--lr auto` holds out to choose the rate
WIDE_FEATURES = 32768  # inputs from which the probe's CPU matmuls use every core (raw pixels of larger images)
DEFAULT_BLOCKS = 4  # the paper's n for ViT-S


def lr_arg(value: str) -> float | str:
    if value == "auto":
        return value
    try:
        lr = float(value)
    except ValueError:
        raise ValueError(f"--lr {value}: a number or 'auto'") from None
    if not lr > 0:
        raise ValueError(f"--lr {value}: must be positive")
    return lr


def register(sub):
    p = sub.add_parser("linear", help="linear probe on frozen features (the paper's protocol)")
    add_common_args(p)
    p.add_argument("--train", required=True, help="labelled source: fashion-mnist:train or a folder of class folders")
    p.add_argument("--test", required=True, help="labelled source, same classes")
    p.add_argument("--last-blocks", type=int, default=None,
                   help=f"[CLS] of this many last blocks, concatenated (default: min({DEFAULT_BLOCKS}, depth))")
    p.add_argument("--avgpool", action="store_true", help="add the last block's averaged patch tokens")
    p.add_argument("--epochs", type=int, default=100)
    grid = ", ".join(f"{lr:g}" for lr in LR_GRID)
    p.add_argument("--lr", type=lr_arg, default="auto",
                   help=f"base rate, scaled by --probe-batch-size / 256; 'auto' (default): the best of {grid} on a "
                        f"held-out {round(HOLDOUT * 100)}%% of the training features (the paper: 0.001)")
    p.add_argument("--no-standardize", dest="standardize", action="store_false",
                   help="feed the raw features (the paper's protocol) instead of per-dimension standardised ones")
    p.add_argument("--probe-batch-size", type=int, default=256, help="batch of the classifier's SGD")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--augment", action="store_true",
                   help="RandomResizedCrop + flip features each epoch through the backbone (slow; the paper's way)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=run)


def probe_features(model, last_blocks: int | None, avgpool: bool) -> tuple[Callable, str, int | None]:
    """What the probe sees: per the paper for ViTs (`last_blocks` None: min(4, depth)); a convnet's pooled
    output or the pixels otherwise. Returns (feature function, cache kind, blocks used or None)."""
    if not hasattr(model, "get_intermediate_layers"):
        return cls_features, "cls", None
    depth = len(model.blocks)
    n = min(DEFAULT_BLOCKS, depth) if last_blocks is None else last_blocks
    if not 1 <= n <= depth:
        raise ValueError(f"--last-blocks must be between 1 and the model's depth {depth}")
    return last_blocks_features(n, avgpool), f"last{n}{'+avgpool' if avgpool else ''}", n


def augment_transform(img: torch.Tensor, normalize: bool = True, crop: int = 224) -> torch.Tensor:
    """RandomResizedCrop (to the crop size, or to the image's own size when it is smaller) and a flip."""
    h, w = img.shape[-2:]
    size = (crop, crop) if min(h, w) > crop else (h, w)
    x = v2.functional.horizontal_flip(img) if random.random() < 0.5 else img
    top, left, ch, cw = v2.RandomResizedCrop.get_params(x, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
    x = v2.functional.resized_crop(x, top, left, ch, cw, list(size), antialias=True)
    return eval_transform(x, crop=crop, normalize=normalize)  # already no larger than crop: normalise only


def new_classifier(dim: int, num_classes: int) -> nn.Linear:
    """The paper's `LinearClassifier` layer: weights N(0, 0.01), zero bias (the same draws from torch's
    global generator as the paper's, so a seed gives the same start)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return linear


def standardizer(train_feats: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-dimension standardisation with the training features' statistics (BatchNorm without affine,
    eps 1e-6). A dimension that barely varies in training keeps a unit scale rather than being blown up.

    >>> f = standardizer(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))
    >>> f(torch.tensor([[2.0, 6.0]]))
    tensor([[0., 1.]])
    """
    mean = train_feats.mean(0)
    std = (train_feats.var(0, unbiased=False) + 1e-6).sqrt()
    std = torch.where(std > 1e-2 * std.mean(), std, torch.ones_like(std))
    return lambda feats: (feats - mean) / std


def train_epoch(module: nn.Module, optimizer, feats: torch.Tensor, labels: torch.Tensor, batch_size: int,
                generator: torch.Generator, loss_fn=nn.functional.cross_entropy) -> float:
    """One pass over the features in a random order (one `randperm` draw from `generator`); the mean loss."""
    order = torch.randperm(len(feats), generator=generator).to(feats.device)
    total = 0.0
    for start in range(0, len(feats), batch_size):
        idx = order[start:start + batch_size]
        loss = loss_fn(module(feats[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(feats)


def train_probe(module: nn.Module, epoch_data: Callable[[int], tuple[torch.Tensor, torch.Tensor]], lr: float,
                epochs: int, batch_size: int, generator: torch.Generator, weight_decay: float = 0.0,
                loss_fn=nn.functional.cross_entropy, progress: bool = False) -> float:
    """The paper's probe optimisation: SGD momentum 0.9 at `lr` (already scaled to the batch), cosine to 0
    per epoch (its CosineAnnealingLR), no weight decay by default. `epoch_data(epoch)` gives that epoch's
    (features, labels). Returns the last epoch's mean loss."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    loss = math.nan
    weight = next(module.parameters())
    with _probe_threads(weight.device, weight.shape[-1]):
        for epoch in tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, leave=False):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
            feats, labels = epoch_data(epoch)
            loss = train_epoch(module, optimizer, feats, labels, batch_size, generator, loss_fn)
    return loss


@contextlib.contextmanager
def _probe_threads(device: torch.device, width: int):
    """One thread for the probe's small CPU matmuls: on a 2-core machine that another process keeps busy,
    more only add synchronisation (an epoch on 60k x 288 features: 2.9 s with 2 threads, 0.15 s with 1).
    Every core for features at least WIDE_FEATURES wide, where the matmuls are large enough to gain from
    them busy or not (36,864 inputs, 6,000 images: 1.29 against 2.38 s an epoch on a quiet machine, 1.14
    against 1.84 on a busy one; at 12,288 a busy machine made 2 threads 4x slower: BENCHMARKS.md)."""
    if device.type != "cpu" or width >= WIDE_FEATURES:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_heads(heads: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, lrs, epochs: int, batch_size: int,
                generator: torch.Generator, progress: bool = False) -> nn.Linear:
    """Trains len(lrs) probes at once as the consecutive blocks of `heads`' outputs, head g at rate lrs[g]
    (already scaled to the batch): each head's loss is weighted by its rate under one SGD at rate 1, which with
    momentum and no weight decay updates every head exactly as training it alone at its rate would."""
    num_classes = heads.out_features // len(lrs)
    scale = torch.tensor(list(lrs), device=feats.device)

    def loss_fn(logits, y):
        per_head = nn.functional.cross_entropy(logits.view(len(y) * len(lrs), num_classes),
                                               y.repeat_interleave(len(lrs)), reduction="none")
        return (per_head.view(len(y), -1) * scale).sum(1).mean()

    train_probe(heads, lambda epoch: (feats, labels), 1.0, epochs, batch_size, generator, loss_fn=loss_fn,
                progress=progress)
    return heads


def select_lr(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, base_lrs=LR_GRID, epochs: int = 100,
              batch_size: int = 256, seed: int = 0, holdout: float = HOLDOUT,
              progress: bool = False) -> tuple[float, dict[float, float]]:
    """The base rate whose probe, trained on all but a random `holdout` share of these (training) features,
    has the best top-1 on that share (ties: the lower held-out loss). All rates train together
    (`train_heads`). Returns (best base rate, {base rate: held-out top-1})."""
    if len(feats) < 2:
        raise ValueError("--lr auto needs at least 2 training images to hold some out; give --lr")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(feats), generator=g).to(feats.device)
    n_held = min(len(feats) - 1, max(1, round(holdout * len(feats))))
    held, fit = order[:n_held], order[n_held:]
    heads = new_classifier(feats.shape[1], num_classes * len(base_lrs)).to(feats.device)
    train_heads(heads, feats[fit], labels[fit], [lr * batch_size / 256 for lr in base_lrs], epochs, batch_size, g,
                progress)
    with torch.no_grad():
        logits = heads(feats[held]).view(n_held, len(base_lrs), num_classes)
        top1 = (logits.argmax(2) == labels[held, None]).float().mean(0) * 100
        loss = nn.functional.cross_entropy(logits.permute(0, 2, 1), labels[held, None].expand(-1, len(base_lrs)),
                                           reduction="none").mean(0)
    top1 = torch.where(torch.isfinite(loss), top1, torch.full_like(top1, -1.0))  # a rate that diverged loses
    best = max(range(len(base_lrs)), key=lambda i: (top1[i].item(), -loss[i].item()))
    return base_lrs[best], {lr: top1[i].item() for i, lr in enumerate(base_lrs)}


def run(args):
    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    train, test = open_source(args.train), open_source(args.test)
    if train.labels is None:
        raise ValueError(f"{train.name} has no labels: the probe needs class sub-folders (or a labelled data set)")
    model = load_model(args.weights, args.which)
    feature_fn, kind, blocks = probe_features(model, args.last_blocks, args.avgpool)
    device = pick_device(args.device)
    wid = None if args.no_cache else weights_id(args.weights, args.which)
    cached = {}
    for name, source in (("train", train), ("test", test)):
        f, kept, skipped = cached_features(model, source, args, kind, feature_fn, transform_for(model), wid,
                                           use_cache=not args.no_cache)
        cached[name] = (f.to(device), labels_for(source, kept, train.classes).to(device), len(skipped))
    (train_f, train_y, train_skip), (test_f, test_y, test_skip) = cached["train"], cached["test"]
    num_classes = max(len(train.classes), int(test_y.max()) + 1)
    dim = train_f.shape[1]
    if isinstance(model, Pixels):  # grey images: one channel of three, the same probe at a third of the cost
        train_f, test_f = Pixels.drop_repeated_channels(train_f, test_f)
    keep = train_f.shape[1]
    standardize = standardizer(train_f) if args.standardize else (lambda f: f)
    prepare = (lambda f: standardize(f[:, :keep])) if keep != dim else standardize  # for augmented features
    train_f, test_f = standardize(train_f), standardize(test_f)

    lines, selection = [], None
    if blocks is not None and args.last_blocks is None:
        lines.append(f"--last-blocks {blocks}: min({DEFAULT_BLOCKS}, the model's depth {len(model.blocks)})")
    base_lr = args.lr
    if base_lr == "auto":
        base_lr, selection = select_lr(train_f, train_y, num_classes, LR_GRID, args.epochs, args.probe_batch_size,
                                       args.seed, progress=not args.quiet)
        lines.append(f"lr chosen on a held-out {HOLDOUT:.0%} of the training features: {base_lr:g} (held-out "
                     "top-1 " + ", ".join(f"{lr:g}: {acc:.2f}%" for lr, acc in selection.items()) + ")")
    lr = base_lr * args.probe_batch_size / 256  # linear scaling rule

    def epoch_data(epoch):
        nonlocal train_skip
        if not args.augment:
            return train_f, train_y
        f, kept, skipped = extract_features(model, train, args.batch_size, device, feature_fn,
                                            partial(augment_transform, normalize=not isinstance(model, Pixels)),
                                            args.num_workers, progress=False)
        train_skip = len(skipped)
        return prepare(f.to(device)), labels_for(train, kept, train.classes).to(device)

    linear = new_classifier(test_f.shape[1], num_classes).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    loss = train_probe(linear, epoch_data, lr, args.epochs, args.probe_batch_size, generator, args.weight_decay,
                       progress=not args.quiet)
    with torch.no_grad():
        top1, top5 = topk_accuracy(linear(test_f), test_y, num_classes)
        train_top1, _ = topk_accuracy(linear(train_f), train_y, num_classes)  # centre-crop features
    log(args, f"final training loss {loss:.4f}")
    out = {"command": "linear", "weights": args.weights, "train": train.name, "test": test.name,
           "features": kind, "last_blocks": blocks, "feature_dim": test_f.shape[1], "standardize": args.standardize,
           "epochs": args.epochs, "base_lr": base_lr, "lr": lr,
           "lr_selection": {f"{k:g}": v for k, v in selection.items()} if selection else None,
           "augment": args.augment, "n_train": len(train_f), "n_test": len(test_f),
           "skipped": {"train": train_skip, "test": test_skip}, "train_loss": loss, "train_top1": train_top1,
           "top1": top1, "top5": top5}
    lines.append(f"linear probe on {kind} features ({test_f.shape[1]}-d{', standardised' * args.standardize}), "
                 f"{args.epochs} epochs at lr {lr:g}: top-1 {top1:.2f}%  top-5 {top5:.2f}%  "
                 f"(train top-1 {train_top1:.2f}%)")
    report(args, out, lines)
    return 0
