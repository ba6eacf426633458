"""`dinokit linear`: a linear classifier on frozen features (the paper's linear probe).

Features: [CLS] of the last n blocks concatenated (n = 4 for ViT-S), optionally with the last block's
averaged patch tokens (the paper's ViT-B setting). One linear layer, SGD momentum 0.9, lr 0.001 x batch / 256
with a per-epoch cosine to 0, no weight decay, 100 epochs.

Fast path (default): the features of centre-cropped images are computed once (and cached); the classifier
trains on them. `--augment`: the paper's protocol, fresh RandomResizedCrop + flip features every epoch."""
import math
import random
from functools import partial

import torch
import torch.nn as nn
from torchvision.transforms import v2
from tqdm import tqdm

from ..data.sources import open_source
from .common import (Pixels, add_common_args, cached_features, load_model, log, pick_device, report, transform_for,
                     weights_id)
from .features import cls_features, eval_transform, extract_features, last_blocks_features
from .knn import topk_accuracy
from .knn_command import labels_for


def register(sub):
    p = sub.add_parser("linear", help="linear probe on frozen features (the paper's protocol)")
    add_common_args(p)
    p.add_argument("--train", required=True, help="labelled source: fashion-mnist:train or a folder of class folders")
    p.add_argument("--test", required=True, help="labelled source, same classes")
    p.add_argument("--last-blocks", type=int, default=4, help="[CLS] of this many last blocks, concatenated")
    p.add_argument("--avgpool", action="store_true", help="add the last block's averaged patch tokens")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.001, help="base rate, scaled by --probe-batch-size / 256")
    p.add_argument("--probe-batch-size", type=int, default=256, help="batch of the classifier's SGD")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--augment", action="store_true",
                   help="RandomResizedCrop + flip features each epoch through the backbone (slow; the paper's way)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true")
    p.set_defaults(func=run)


def probe_features(model, last_blocks: int, avgpool: bool):
    """What the probe sees: per the paper for ViTs; a convnet's pooled output or the pixels otherwise."""
    if not hasattr(model, "get_intermediate_layers"):
        return cls_features, "cls"
    if not 1 <= last_blocks <= len(model.blocks):
        raise ValueError(f"--last-blocks must be between 1 and the model's depth {len(model.blocks)}")
    return last_blocks_features(last_blocks, avgpool), f"last{last_blocks}{'+avgpool' if avgpool else ''}"


def augment_transform(img: torch.Tensor, normalize: bool = True, crop: int = 224) -> torch.Tensor:
    """RandomResizedCrop (to the crop size, or to the image's own size when it is smaller) and a flip."""
    h, w = img.shape[-2:]
    size = (crop, crop) if min(h, w) > crop else (h, w)
    x = v2.functional.horizontal_flip(img) if random.random() < 0.5 else img
    top, left, ch, cw = v2.RandomResizedCrop.get_params(x, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
    x = v2.functional.resized_crop(x, top, left, ch, cw, list(size), antialias=True)
    return eval_transform(x, crop=crop, normalize=normalize)  # already no larger than crop: normalise only


def new_classifier(dim: int, num_classes: int) -> nn.Linear:
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return linear


def train_epoch(linear: nn.Linear, optimizer, feats: torch.Tensor, labels: torch.Tensor, batch_size: int,
                generator: torch.Generator) -> float:
    """One pass over the features in a random order; the mean loss."""
    order = torch.randperm(len(feats), generator=generator)
    total = 0.0
    for start in range(0, len(feats), batch_size):
        idx = order[start:start + batch_size]
        loss = nn.functional.cross_entropy(linear(feats[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
    return total / len(feats)


def run(args):
    if args.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    train, test = open_source(args.train), open_source(args.test)
    if train.labels is None:
        raise ValueError(f"{train.name} has no labels: the probe needs class sub-folders (or a labelled data set)")
    model = load_model(args.weights, args.which)
    feature_fn, kind = probe_features(model, args.last_blocks, args.avgpool)
    device = pick_device(args.device)
    wid = None if args.no_cache else weights_id(args.weights, args.which)
    cached = {}
    for name, source in (("train", train), ("test", test)):
        if name == "train" and args.augment:
            continue
        f, kept, skipped = cached_features(model, source, args, kind, feature_fn, transform_for(model), wid,
                                           use_cache=not args.no_cache)
        cached[name] = (f.to(device), labels_for(source, kept, train.classes).to(device), len(skipped))
    test_f, test_y, test_skip = cached["test"]
    num_classes = max(len(train.classes), int(test_y.max()) + 1)

    linear = new_classifier(test_f.shape[1], num_classes).to(device)
    lr = args.lr * args.probe_batch_size / 256  # linear scaling rule
    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    train_skip, loss = 0, math.nan
    for epoch in tqdm(range(args.epochs), desc="linear probe", unit="epoch", disable=args.quiet, leave=False):
        for group in optimizer.param_groups:  # cosine from lr to 0, per epoch
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / args.epochs))
        if args.augment:
            f, kept, skipped = extract_features(model, train, args.batch_size, device, feature_fn,
                                                partial(augment_transform, normalize=not isinstance(model, Pixels)),
                                                args.num_workers, progress=False)
            train_f, train_y, train_skip = f.to(device), labels_for(train, kept, train.classes).to(device), len(skipped)
        else:
            train_f, train_y, train_skip = cached["train"]
        loss = train_epoch(linear, optimizer, train_f, train_y, args.probe_batch_size, generator)
    with torch.no_grad():
        top1, top5 = topk_accuracy(linear(test_f), test_y, num_classes)
        train_top1, _ = topk_accuracy(linear(train_f), train_y, num_classes)
    log(args, f"final training loss {loss:.4f}")
    out = {"command": "linear", "weights": args.weights, "train": train.name, "test": test.name,
           "features": kind, "feature_dim": test_f.shape[1], "epochs": args.epochs, "lr": lr,
           "augment": args.augment, "n_train": len(train_f), "n_test": len(test_f),
           "skipped": {"train": train_skip, "test": test_skip}, "train_loss": loss, "train_top1": train_top1,
           "top1": top1, "top5": top5}
    report(args, out, [f"linear probe on {kind} features ({test_f.shape[1]}-d), {args.epochs} epochs: "
                       f"top-1 {top1:.2f}%  top-5 {top5:.2f}%  (train top-1 {train_top1:.2f}%)"])
    return 0
