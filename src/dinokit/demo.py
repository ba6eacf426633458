"""`dinokit demo`: the main job end to end. Train on Fashion-MNIST within a time budget, evaluate the teacher
with both of the paper's protocols (weighted k-NN and a linear probe) beside the same protocols on raw pixels,
and draw what it learned."""
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import main as cli_main
from .data.sources import open_source
from .train.command import parse_duration


def register(sub):
    p = sub.add_parser("demo", help="train on Fashion-MNIST for 14 minutes, evaluate (k-NN, linear probe), "
                                    "draw attention maps")
    p.add_argument("--out", help="run folder (default: runs/demo-DATE-TIME)")
    p.add_argument("--data", default="fashion-mnist:train")
    p.add_argument("--test", default="fashion-mnist:test")
    p.add_argument("--preset", default="fmnist-cpu",
                   help="fmnist-cpu (default), auto (chosen from the data), paper, ...")
    p.add_argument("--time-budget", type=parse_duration, default=parse_duration("14m"),
                   help="training time (default 14m: with evaluation, about 17 minutes on a 2-core CPU)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--images", type=int, default=6, help="test images to draw attention maps for")
    p.set_defaults(func=run)


KNN = ["knn", "--k", "10", "20", "100", "200"]
# The probe on [CLS] of the last blocks plus the averaged patch tokens (the paper's ViT-B feature set): on the
# demo's narrow ViT it is 1 point above the [CLS] tokens alone (BENCHMARKS.md).
LINEAR = ["linear", "--avgpool"]


def evaluate(command: list[str], weights: str, train: str, test: str) -> dict:
    """An evaluation command with `--json`, in-process; its last stdout line is the result. The pixel
    baseline's result depends only on the data: it is cached beside the feature cache."""
    import contextlib
    import hashlib
    import io

    from .eval.common import PIXELS, cache_dir, source_id
    key = None
    if weights == PIXELS:
        ids = "|".join(source_id(open_source(s)) for s in (train, test))
        key = cache_dir() / f"baseline-{hashlib.sha256(f'{command}|{ids}'.encode()).hexdigest()[:24]}.json"
        if key.is_file():
            return json.loads(key.read_text())
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli_main([*command, "--weights", weights, "--train", train, "--test", test, "--json", "--quiet"])
    if code:
        raise RuntimeError(f"dinokit {command[0]} failed (exit {code}): see the messages above")
    result = json.loads(buf.getvalue().strip().splitlines()[-1])
    if key is not None:
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_text(json.dumps(result))
    return result


def attention_figure(weights: str, source, indices: list[int], out: Path) -> Path:
    """One picture: each image beside its heads' [CLS] attention and the 60%-mass masks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .eval.attention import cls_attention, mass_mask
    from .data.normalize import normalize
    from .models.weights import load_backbone

    model = load_backbone(weights)
    heads = model.num_heads
    fig, axes = plt.subplots(len(indices), 1 + 2 * heads, figsize=(1.6 * (1 + 2 * heads), 1.7 * len(indices)))
    axes = np.atleast_2d(axes)
    with torch.no_grad():
        for row, i in zip(axes, indices):
            x = source.read(i).float() / 255
            attn = cls_attention(model, normalize(x))
            masks = mass_mask(attn)
            row[0].imshow(x.permute(1, 2, 0).numpy())
            row[0].set_title(source.classes[source.labels[i]] if source.labels else "", fontsize=8)
            for h in range(heads):
                row[1 + h].imshow(attn[h].numpy(), cmap="inferno")
                row[1 + heads + h].imshow(masks[h].numpy(), cmap="gray", vmin=0, vmax=1)
                if i == indices[0]:
                    row[1 + h].set_title(f"head {h}", fontsize=8)
                    row[1 + heads + h].set_title(f"60% mask {h}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle("[CLS] self-attention of the last block (teacher)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run(args):
    from .train.config import auto_values, resolve
    from .train.loop import check_run_folder, train

    out = Path(args.out or f"runs/demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.time_budget <= 0:
        raise ValueError("--time-budget must be more than 0 seconds")
    check_run_folder(out, resume=False)  # before anything is read or trained
    preset, notes = args.preset, None
    if preset == "auto":
        base = resolve(None, None, args.sets, data=args.data, validate=False)
        preset, reasons = auto_values(base.data, base.device, args.time_budget)
        notes = {"auto": reasons}
    cfg = resolve(preset, None, args.sets, data=args.data)
    test_source = open_source(args.test)  # fail now, not after training, if the test data is missing
    started = time.time()
    print(f"training {args.preset} on {args.data} for {args.time_budget / 60:.1f} min -> {out}", flush=True)
    summary = train(cfg, out, time_budget=args.time_budget, notes=notes)
    train_s = time.time() - started
    weights = str(out / "checkpoint.pt")
    print("evaluating: weighted k-NN of the teacher's [CLS] features, and of raw pixels", flush=True)
    ours, pixels = (evaluate(KNN, w, args.data, args.test)["results"] for w in (weights, "pixels"))
    print("evaluating: linear probe on the teacher's frozen features, and on raw pixels", flush=True)
    probe, pixels_probe = (evaluate(LINEAR, w, args.data, args.test) for w in (weights, "pixels"))

    rng = np.random.default_rng(0)
    picks = sorted(rng.choice(len(test_source), size=min(args.images, len(test_source)), replace=False).tolist())
    figure = attention_figure(weights, test_source, picks, out / "attention.png")
    inputs = out / "attention" / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in picks:  # the per-head maps of `dinokit attention`, for each picked image
        paths.append(str(inputs / f"test{i:05d}.png"))
        Image.fromarray(test_source.read(i).permute(1, 2, 0).numpy()).save(paths[-1])
    cli_main(["attention", "--weights", weights, *paths, "--out", str(out / "attention"), "--image-size", "0",
              "--quiet"])

    result = {"run_dir": str(out), "train_seconds": round(train_s, 1), "steps": summary["step"],
              "total_seconds": round(time.time() - started, 1),
              "knn_top1": {k: v["top1"] for k, v in ours.items()},
              "pixels_knn_top1": {k: v["top1"] for k, v in pixels.items()},
              "linear": {k: probe[k] for k in ("top1", "top5", "train_top1", "features", "lr")},
              "pixels_linear": {k: pixels_probe[k] for k in ("top1", "top5", "train_top1", "features", "lr")}}
    (out / "demo.json").write_text(json.dumps(result, indent=2))
    print("\n== dinokit demo ==")
    print(f"trained {summary['step']} steps in {train_s / 60:.1f} min; whole demo {result['total_seconds'] / 60:.1f} min")
    print(f"{'k-NN top-1 (T=0.07)':24s}" + "".join(f"{'k=' + k:>9s}" for k in ours))
    print(f"{'DINO teacher [CLS]':24s}" + "".join(f"{v['top1']:8.2f}%" for v in ours.values()))
    print(f"{'raw pixels':24s}" + "".join(f"{v['top1']:8.2f}%" for v in pixels.values()))
    print(f"\n{'linear probe top-1':24s}{'test':>9s}{'train':>9s}  features")
    for name, r in (("DINO teacher", probe), ("raw pixels", pixels_probe)):
        print(f"{name:24s}{r['top1']:8.2f}%{r['train_top1']:8.2f}%  {r['features']} ({r['feature_dim']}-d), "
              f"lr {r['lr']:g}")
    print(f"\nrun folder      {out}")
    print(f"checkpoint      {weights}")
    print(f"training curves {summary['curves']}")
    print(f"attention       {figure}  (per-head maps: {out / 'attention'})")
    print(f"metrics         {out / 'metrics.jsonl'}  (TensorBoard: tensorboard --logdir {out / 'tensorboard'})")
    print(f"results         {out / 'demo.json'}")
    return 0
