"""`dinokit knn`: weighted k-NN classification of a test set by a training set's frozen [CLS] features."""
import time

import torch
import torch.nn.functional as F

from ..data.sources import open_source
from ..device import pick_device
from .common import (Pixels, add_common_args, cached_features, load_model, log, report, transform_for,
                     weights_id)
from .features import cls_features
from .knn import knn_evaluate


def register(sub):
    p = sub.add_parser("knn", help="weighted k-NN accuracy of frozen [CLS] features (the paper's protocol)")
    add_common_args(p)
    p.add_argument("--train", required=True, help="labelled source: fashion-mnist:train or a folder of class folders")
    p.add_argument("--test", required=True, help="labelled source, same classes")
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200])
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--no-cache", action="store_true", help="recompute features even when cached")
    p.set_defaults(func=run)


def labels_for(source, kept: list[int], classes: list[str]) -> torch.Tensor:
    """Class ids of the kept images in the numbering of `classes` (the training set's)."""
    if source.labels is None:
        raise ValueError(f"{source.name} has no labels: k-NN needs class sub-folders (or a labelled data set)")
    if source.classes != classes:
        unknown = sorted(set(source.classes) - set(classes))
        if unknown:
            raise ValueError(f"{source.name} has classes the training set lacks: {', '.join(unknown[:5])}")
        index = {c: i for i, c in enumerate(classes)}
        return torch.tensor([index[source.classes[source.labels[i]]] for i in kept])
    return torch.tensor([source.labels[i] for i in kept])


def run(args):
    if any(k < 1 for k in args.k) or args.temperature <= 0:
        raise ValueError("--k must be positive integers and --temperature positive")
    train, test = open_source(args.train), open_source(args.test)
    if train.labels is None:
        raise ValueError(f"{train.name} has no labels: k-NN needs class sub-folders (or a labelled data set)")
    model = load_model(args.weights, args.which)
    transform = transform_for(model)
    wid = None if args.no_cache else weights_id(args.weights, args.which)
    feats = {}
    for name, source in (("train", train), ("test", test)):
        f, kept, skipped = cached_features(model, source, args, "cls", cls_features, transform, wid,
                                           use_cache=not args.no_cache)
        feats[name] = (f, labels_for(source, kept, train.classes), len(skipped))
    (train_f, train_y, train_skip), (test_f, test_y, test_skip) = feats["train"], feats["test"]
    if isinstance(model, Pixels):
        train_f, test_f = Pixels.drop_repeated_channels(train_f, test_f)
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    device = pick_device(args.device)
    start = time.perf_counter()
    results = knn_evaluate(train_f.to(device), train_y.to(device), test_f.to(device), test_y.to(device),
                           args.k, args.temperature, num_classes=max(len(train.classes), int(train_y.max()) + 1))
    log(args, f"k-NN of {len(test_f)} queries against {len(train_f)} features ({train_f.shape[1]}-d): "
              f"{time.perf_counter() - start:.2f} s")
    used = {k: min(k, len(train_f)) for k in results}  # k beyond the training set: every image votes
    out = {"command": "knn", "weights": args.weights, "train": train.name, "test": test.name,
           "n_train": len(train_f), "n_test": len(test_f), "skipped": {"train": train_skip, "test": test_skip},
           "temperature": args.temperature,
           "results": {str(k): {"top1": t1, "top5": t5, "k_used": used[k]} for k, (t1, t5) in results.items()}}
    lines = [f"{k}-NN (T={args.temperature}): top-1 {t1:.2f}%  top-5 {t5:.2f}%"
             + (f"  (k capped at {used[k]}: only {len(train_f)} training images)" if used[k] < k else "")
             for k, (t1, t5) in results.items()]
    report(args, out, lines)
    return 0
