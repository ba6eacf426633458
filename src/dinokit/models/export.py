"""`dinokit export`: a backbone's weights in the formats other tools read.

- `safetensors`: dinokit's own file; the architecture rides along as JSON in the metadata key `dinokit_arch`.
- `official`: the paper code's backbone `.pth`, a bare state dict with the reference's names (what its
  `load_pretrained_weights` and its released `dino_*_pretrain.pth` files hold).
- `timm`: a state dict for timm's matching model (`vit_small_patch16_224`, `resnet50`, ... with
  `num_classes=0`); timm's DINO ViTs use the reference's names, so only the container differs.
- `hf`: a folder with `config.json` and `model.safetensors` for transformers' `ViTModel` (ViTs only).
- `onnx`: the backbone's forward ([CLS] features for a ViT, pooled features for a ResNet), with dynamic batch
  and image size.

Every export reloads through `load_backbone` (ONNX through onnxruntime) to the same features. Files are
written in full under a temporary name before they replace anything.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

from ..eval.common import atomic_write, check_outputs, save_safetensors
from .vit import VisionTransformer
from .weights import backbone_arch, load_backbone, reference_to_hf, vit_arch_from_state_dict

FORMATS = ("safetensors", "onnx", "official", "timm", "hf")


def _tensors(model: nn.Module) -> dict:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def export_safetensors(model: nn.Module, path: Path):
    arch = json.dumps(backbone_arch(model))
    save_safetensors(_tensors(model), path, metadata={"format": "pt", "dinokit_arch": arch})


def export_official(model: nn.Module, path: Path):
    with atomic_write(path) as tmp:
        torch.save(_tensors(model), tmp)


def export_timm(model: nn.Module, path: Path):
    if path.suffix == ".safetensors":  # what timm's own hub weights are stored as
        save_safetensors(_tensors(model), path, metadata={"format": "pt"})
    else:
        export_official(model, path)


def export_hf(model: nn.Module, folder: Path):
    if not isinstance(model, VisionTransformer):
        raise ValueError("the hf format is transformers' ViTModel: it holds ViTs only")
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the hf format writes a folder, and {folder} is a file")
    arch = model.arch()
    config = {
        "model_type": "vit", "architectures": ["ViTModel"], "hidden_size": arch["embed_dim"],
        "num_hidden_layers": arch["depth"], "num_attention_heads": arch["num_heads"],
        "intermediate_size": model.blocks[0].mlp.fc1.out_features, "patch_size": arch["patch_size"],
        "image_size": arch["img_size"], "num_channels": 3, "layer_norm_eps": 1e-6, "qkv_bias": True,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    save_safetensors(reference_to_hf(_tensors(model)), folder / "model.safetensors", metadata={"format": "pt"})


def bicubic_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """(n_out, n_in) weights of PyTorch's bicubic resize (align_corners False, A = -0.75) by the scale
    factor (n_out + 0.1) / n_in, the reference's position-embedding resize, as plain tensor ops.

    `F.interpolate` with a scale factor computed from the image size traces to a constant: ONNX would only
    serve the export size. Built from the traced size, this matrix follows the input.
    """
    size = torch.scalar_tensor(n_out)  # a tensor, so the image size stays symbolic in the graph
    dst = torch.arange(n_out, dtype=torch.float32)
    src = (dst + 0.5) * (n_in / (size + 0.1)) - 0.5
    left = src.floor()
    t = (src - left)[:, None]
    a = -0.75
    dist = torch.cat([t + 1, t, 1 - t, 2 - t], dim=1)  # to the 4 input samples around src
    near = ((a + 2) * dist - (a + 3)) * dist * dist + 1
    far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
    weight = torch.where(dist <= 1, near, far)
    index = (left[:, None] + torch.arange(-1, 3)).clamp(0, n_in - 1)  # borders repeat the edge sample
    onehot = (index[:, :, None] == torch.arange(n_in)).float()
    return (weight[:, :, None] * onehot).sum(1)


class TraceableViT(nn.Module):
    """The ViT's [CLS] features, with the position-embedding resize written so that it traces for any size.

    Same numbers as `VisionTransformer.forward` (to float rounding): the native grid of a square image
    uses the stored embeddings; every other size their bicubic resize.
    """

    def __init__(self, vit: VisionTransformer):
        super().__init__()
        self.vit = vit

    def pos_embed(self, h: int, w: int) -> torch.Tensor:
        vit, p = self.vit, self.vit.patch_size
        grid = int(round((vit.pos_embed.shape[1] - 1) ** 0.5))
        gh, gw = h // p, w // p
        height, width = torch.scalar_tensor(h), torch.scalar_tensor(w)
        native = (height == width) & (torch.scalar_tensor(gh) == grid) & (torch.scalar_tensor(gw) == grid)
        # On the native grid the resize is skipped: the identity stands in for it (same shape there).
        rows = torch.where(native, torch.eye(gh, grid), bicubic_matrix(gh, grid))
        cols = torch.where(native, torch.eye(gw, grid), bicubic_matrix(gw, grid))
        patch_pos = vit.pos_embed[0, 1:].reshape(grid, grid, -1)
        patch_pos = torch.einsum("ia,jb,abd->ijd", rows, cols, patch_pos).reshape(1, gh * gw, -1)
        return torch.cat((vit.pos_embed[:, :1], patch_pos), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        B, _, h, w = x.shape
        h, w = vit.positions_size(h, w)  # as the model's own
        x = torch.cat((vit.cls_token.expand(B, -1, -1), vit.patch_embed(x)), dim=1) + self.pos_embed(h, w)
        for blk in vit.blocks:
            x = blk(x)
        return vit.norm(x)[:, 0]


def export_onnx(model: nn.Module, path: Path, image_size: int = 224):
    """ONNX graph `images` (B, 3, H, W) -> `features` (B, D), batch and image size dynamic."""
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ValueError(f"ONNX export needs the onnx and onnxscript packages ({e})") from None
    model = model.float().eval()
    traced = TraceableViT(model).eval() if isinstance(model, VisionTransformer) else model
    smallest = model.patch_size if isinstance(model, VisionTransformer) else 32
    batch, height, width = (torch.export.Dim("batch", min=1), torch.export.Dim("height", min=smallest),
                            torch.export.Dim("width", min=smallest))
    example = torch.randn(2, 3, image_size, image_size)  # batch 2: a size-1 example would be fixed to 1
    with atomic_write(path) as tmp:
        torch.onnx.export(traced, (example,), str(tmp), dynamo=True, input_names=["images"],
                          output_names=["features"], dynamic_shapes={"x": {0: batch, 2: height, 3: width}},
                          external_data=False, verbose=False)


@torch.no_grad()
def onnx_max_difference(model: nn.Module, path: Path, shapes) -> float:
    """Largest |onnxruntime - PyTorch| over random inputs of the given (B, 3, H, W) shapes."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    model = model.float().eval()
    worst = 0.0
    for shape in shapes:
        x = torch.randn(*shape)
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        worst = max(worst, (got - model(x)).abs().max().item())
    return worst


EXPORTERS = {"safetensors": export_safetensors, "official": export_official, "timm": export_timm,
             "hf": export_hf, "onnx": export_onnx}
HF_FILES = ("config.json", "model.safetensors")


def output_files(fmt: str, out: str | Path) -> list[Path]:
    """The files an export writes: `out`, or for hf the two files in the folder `out`."""
    return [Path(out) / name for name in HF_FILES] if fmt == "hf" else [Path(out)]


def export_backbone(model: nn.Module, fmt: str, out: str | Path, **kwargs):
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt in ("official", "timm", "hf") and getattr(model, "stem", "patch") != "patch":
        raise ValueError(f"this ViT has a convolutional stem, which the {fmt} format's ViT has no place for "
                         "(it has one patch projection): export it as safetensors or onnx")
    out = Path(out)
    if fmt != "hf":
        out.parent.mkdir(parents=True, exist_ok=True)
    EXPORTERS[fmt](model.eval(), out, **kwargs)
    return out


def register(sub):
    p = sub.add_parser("export", help="write a backbone's weights as safetensors, ONNX, official, timm or hf")
    p.add_argument("--weights", required=True, help="any weight file load_backbone reads")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output file (a folder for --format hf)")
    p.add_argument("--which", default="teacher", choices=("teacher", "student"),
                   help="in a training checkpoint, which network's backbone")
    p.add_argument("--num-heads", type=int, help="ViT heads, where the weights cannot tell (non-standard width)")
    p.add_argument("--image-size", type=int, default=None, help="ONNX example input size (default: the model's)")
    p.add_argument("--force", action="store_true",
                   help="overwrite the output when it exists (never the --weights file itself)")
    p.set_defaults(func=run)


def run(args):
    check_outputs(output_files(args.format, args.out), args.force, args.weights)
    model = load_backbone(args.weights, which=args.which, num_heads=args.num_heads)
    kwargs = {}
    if args.format == "onnx":
        kwargs["image_size"] = args.image_size or getattr(model, "img_size", 224)
    out = export_backbone(model, args.format, args.out, **kwargs)
    arch = backbone_arch(model)
    print(f"wrote {args.which} backbone {arch} as {args.format} to {out}")
    if args.format in ("official", "timm") and "num_heads" in arch:
        read_back = vit_arch_from_state_dict(model.state_dict())["num_heads"]
        if read_back != arch["num_heads"]:  # the layout has no field for it; the width's standard count is read
            print(f"warning: the {args.format} layout does not record the head count: this ViT has "
                  f"{arch['num_heads']} heads, where its width {arch['embed_dim']} reads back as {read_back}; "
                  f"load it with num_heads={arch['num_heads']} (load_backbone, dinokit export --num-heads), "
                  "or export as safetensors or hf, which keep it", file=sys.stderr)
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            print("onnxruntime is not installed: the ONNX file was not checked")
            return 0
        size, step = kwargs["image_size"], getattr(model, "patch_size", 32)
        diff = onnx_max_difference(model, out, [(2, 3, size, size), (1, 3, size + 2 * step, size + step)])
        print(f"onnxruntime vs PyTorch, max |difference|: {diff:.2e}")
        if diff > 1e-3:
            raise ValueError(f"the ONNX export disagrees with the model (max difference {diff:.2e})")
    return 0
