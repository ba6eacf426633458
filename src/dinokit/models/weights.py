"""Weight files: safe reading, format recognition, and building the backbone they describe.

Formats read by `load_backbone`, told apart by their keys, never by the file name:
- official DINO backbone `.pth` (a bare ViT or ResNet state dict);
- official full training checkpoint (`teacher` / `student`, keys prefixed `module.` and `backbone.`), and
  dinokit's own training checkpoints, which share that layout;
- timm's DINO ViTs (the official key names, plus an optional classifier `head.*`);
- Hugging Face `ViTModel` (`embeddings.*`, `encoder.layer.N.*`, optionally under `vit.`), from a folder
  or a file with `config.json` beside it;
- safetensors files, dinokit's exports carrying the architecture in their metadata.

Nothing is unpickled beyond tensors and plain containers: `torch.load(weights_only=True)`, with only
`argparse.Namespace` (the `args` of official checkpoints) added to what it accepts.
"""
import argparse
import json
import pickle
import pickletools
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, safe_open

from .convnets import CONVNETS, convnet
from .vit import CONV_STEMS, VIT_SIZES, VisionTransformer


class UnsafeCheckpointError(ValueError):
    """A weight file holds something other than tensors and plain data; it was not loaded."""


def _is_safetensors(head: bytes) -> bool:
    # An 8-byte little-endian header length, then the JSON header.
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _pickle_globals(path: Path) -> list[str]:
    """The `module.name` globals a plain pickle file would import, read without unpickling it."""
    names, strings = [], []
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
    except Exception:  # a malformed stream: report what was seen before it broke
        pass
    return names


def safe_load(path: str | Path) -> dict:
    """Read a PyTorch (`.pt`/`.pth`/`.bin`) or safetensors file into a dict without running code from it.

    The format is told from the file's first bytes, not its name.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weight file at {path}")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) < 16:
        raise ValueError(f"{path} is empty or truncated ({len(head)} bytes)")
    if _is_safetensors(head):
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    is_zip, is_pickle = head.startswith(b"PK\x03\x04"), head.startswith(b"\x80")
    if not (is_zip or is_pickle):
        raise ValueError(f"{path} is neither a PyTorch checkpoint nor a safetensors file "
                         f"(it starts with {head[:8]!r})")
    try:
        if hasattr(torch.serialization, "safe_globals"):
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        else:  # torch 2.4
            torch.serialization.add_safe_globals([argparse.Namespace])
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        detail = next((ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        # torch names only the first forbidden global; a plain pickle can be read through for all of them
        found = re.findall(r"GLOBAL ([\w.]+)", str(e)) if is_zip else _pickle_globals(path)
        if found:
            detail = f"it would import {', '.join(dict.fromkeys(found))}"
        raise UnsafeCheckpointError(
            f"refused to load {path}: it contains pickled objects other than tensors and plain data "
            f"({detail.strip()}). Nothing from it was executed. If you trust the file, convert it to "
            f"safetensors in an environment where unpickling it is safe.") from None
    except (RuntimeError, EOFError, KeyError, IndexError) as e:  # KeyError: an unknown pickle opcode
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


def _strip(sd: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _hf_config(path: Path) -> dict | None:
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


HF_BLOCK = {  # Hugging Face ViT name -> reference name, inside encoder.layer.N / blocks.N
    "layernorm_before": "norm1", "layernorm_after": "norm2", "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
}


HF5_TO_HUB = [  # transformers >= 5 names its modules differently in memory; files keep the Hub's names
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."), (r"\.attention\.q_proj\.", ".attention.attention.query."),
    (r"\.attention\.k_proj\.", ".attention.attention.key."),
    (r"\.attention\.v_proj\.", ".attention.attention.value."),
    (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
    (r"\.mlp\.fc2\.", ".output.dense."),
]


def _hf_hub_names(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        if k.startswith("layers."):
            for pattern, repl in HF5_TO_HUB:
                k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def hf_to_reference(sd: dict) -> dict:
    """Hugging Face `ViTModel` keys to the reference ViT's (query/key/value fused into qkv).

    Reads both the names in Hub files (`encoder.layer.N.attention.attention.query`) and those of a
    transformers >= 5 model's `state_dict()` (`layers.N.attention.q_proj`).
    """
    sd = _hf_hub_names(_strip(sd, ("vit.",)))
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.", k)))
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"attn.qkv.{part}"] = torch.cat(
                [sd[src + f"attention.attention.{n}.{part}"] for n in ("query", "key", "value")])
            for hf, ref in HF_BLOCK.items():
                out[dst + f"{ref}.{part}"] = sd[src + f"{hf}.{part}"]
    return out


def reference_to_hf(sd: dict) -> dict:
    """The reference ViT's keys to Hugging Face `ViTModel`'s as its files name them (what `save_pretrained`
    writes and `from_pretrained` reads, in every transformers version); inverse of `hf_to_reference`."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            q, k, v = sd[src + f"attn.qkv.{part}"].chunk(3)
            for name, t in zip(("query", "key", "value"), (q, k, v)):
                out[dst + f"attention.attention.{name}.{part}"] = t.contiguous()
            for hf, ref in HF_BLOCK.items():
                out[dst + f"{hf}.{part}"] = sd[src + f"{ref}.{part}"]
    return out


def vit_arch_from_state_dict(sd: dict, num_heads: int | None = None, stem: str | None = None) -> dict:
    """ViT constructor arguments implied by the tensors. Heads cannot be seen: `num_heads`, else the standard
    sizes'. Nor can a conv stem's activation: `stem` where its layout is the tensors', else that layout's GELU stem."""
    heads_of_width = {width: heads for width, _, heads in VIT_SIZES.values()}
    dim = sd["cls_token"].shape[-1]
    stem_convs = sum(1 for k in sd if re.fullmatch(r"patch_embed\.stem\.\d+\.weight", k))
    patch = 2 ** stem_convs if stem_convs else sd["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    grid = int(round((sd["pos_embed"].shape[1] - 1) ** 0.5))
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=dim, depth=depth,
                num_heads=num_heads or heads_of_width.get(dim, max(dim // 64, 1)),
                mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                **({"stem": _conv_stem(sd, stem)} if stem_convs else {}))


def _conv_stem(sd: dict, hint: str | None) -> str:
    seen = "conv-full" if "patch_embed.full.0.weight" in sd else "conv"
    same_layout = hint in CONV_STEMS and CONV_STEMS[hint][0] == CONV_STEMS[seen][0]
    return hint if same_layout else seen


def _resnet_name(sd: dict) -> str:
    bottleneck = "layer1.0.conv3.weight" in sd
    blocks = tuple(1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"layer{i}\.(\d+)\.", k))), default=-1)
                   for i in range(1, 5))
    known = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
             (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
             (True, (3, 8, 36, 3)): "resnet152"}
    if (bottleneck, blocks) not in known:
        raise ValueError(f"unrecognised ResNet layout (blocks per stage {blocks})")
    return known[(bottleneck, blocks)]


def build_backbone(arch: dict, drop_path_rate: float = 0.0) -> nn.Module:
    """A backbone from an `arch` dict: {"name": "vit", **VisionTransformer kwargs} or {"name": "resnet50"}.
    `drop_path_rate`: a ViT's stochastic depth (the training student's; 0 for inference).

    >>> build_backbone({"name": "vit", "patch_size": 16, "embed_dim": 192, "depth": 2, "num_heads": 3}).embed_dim
    192
    """
    arch = dict(arch)
    name = arch.pop("name")
    if name == "vit":
        return VisionTransformer(**arch, drop_path_rate=drop_path_rate)
    if name in CONVNETS:
        return convnet(name)
    raise ValueError(f"unknown backbone {name!r}")


def backbone_arch(model: nn.Module) -> dict:
    """What `build_backbone` needs to rebuild `model` (saved beside its weights)."""
    if isinstance(model, VisionTransformer):
        return {"name": "vit", **model.arch()}
    return {"name": model.arch_name}


def backbone_state_dict(obj: dict, which: str = "teacher") -> tuple[dict, dict | None]:
    """The backbone's reference-named tensors inside any supported layout, and its arch if recorded."""
    arch = None
    if isinstance(obj.get("dinokit"), dict):
        arch = obj["dinokit"].get("arch")
    if "teacher" in obj or "student" in obj:
        if which not in obj:
            raise KeyError(f"checkpoint has no {which!r} weights (it has: {', '.join(k for k in obj)})")
        obj = obj[which]
    for key in ("state_dict", "model"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(("embeddings.", "vit.embeddings.")) for k in sd):
        return hf_to_reference(sd), arch
    sd = _strip(sd, ("module.", "_orig_mod.", "backbone."))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc.", "fc_norm.")) and k != "mask_token"}
    return sd, arch


def read_weight_file(path: str | Path) -> tuple[dict, dict | None]:
    """The contents of any weight file or folder `load_backbone` reads, as a dict (a dinokit safetensors
    export's recorded architecture folded in), and the Hugging Face config.json beside it, if any."""
    path = Path(path)
    hf_cfg = _hf_config(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")
        path = found[0]
    obj = safe_load(path)
    with open(path, "rb") as f:
        stored_as_safetensors = _is_safetensors(f.read(16))
    if stored_as_safetensors:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if "dinokit_arch" in meta:
            obj = {"dinokit": {"arch": json.loads(meta["dinokit_arch"])}, "state_dict": obj}
    return obj, hf_cfg


def backbone_weights(obj: dict, which: str = "teacher", num_heads: int | None = None,
                     hf_config: dict | None = None, name: str = "", stem: str | None = None) -> tuple[dict, dict]:
    """A weight file's backbone tensors (reference names) and its architecture, recorded or read from the
    tensors' shapes (ViT heads: `num_heads`, the Hugging Face config's, or the standard width's; a conv
    stem's activation: `stem`'s, see `vit_arch_from_state_dict`)."""
    sd, arch = backbone_state_dict(obj, which)
    if arch is None:
        if "cls_token" in sd:
            heads = num_heads or (hf_config or {}).get("num_attention_heads")
            arch = {"name": "vit", **vit_arch_from_state_dict(sd, heads, stem)}
        elif "conv1.weight" in sd:
            arch = {"name": _resnet_name(sd)}
        else:
            raise ValueError(f"{name}: no ViT or ResNet backbone recognised (first keys: {list(sd)[:5]})")
    return sd, arch


def load_backbone(path: str | Path, which: str = "teacher", num_heads: int | None = None) -> nn.Module:
    """Build the backbone a weight file describes and load it (strict). See the module doc for formats.

    `which` picks `teacher` (the paper's choice for evaluation) or `student` in a training checkpoint.

    >>> model = load_backbone("dino_deitsmall16_pretrain.pth")  # doctest: +SKIP
    """
    obj, hf_config = read_weight_file(path)
    sd, arch = backbone_weights(obj, which, num_heads, hf_config, str(path))
    model = build_backbone(arch)
    model.load_state_dict(sd, strict=True)
    return model.eval()
