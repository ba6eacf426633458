"""What a ViT shows of one image, for every block: the [CLS] attention of each head, the patches holding a
share of its mass, and the first three principal components of the patch features as colours. Maps stay at
the patch grid; the page scales them up (one solid square per patch: what the model saw)."""
import base64
import io

import numpy as np
import torch
from PIL import Image

from ..eval.attention import heat_map, mass_mask, prepare
from ..eval.features import MEAN, STD

MASK_SHADE = 170  # alpha (of 255) laid over the patches a mask leaves out
MAX_PATCHES = 4096  # e.g. 64 x 64 at patch 16: each block's attention matrix stays near 100 MB per head group


def model_input(img: torch.Tensor, image_size: int, patch_size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> [0, 1] float cropped to whole patches; the shorter side brought down to
    `image_size` when it is larger (never up: a 28-pixel image stays 28 pixels; 0 keeps any size), and the
    whole image down to at most MAX_PATCHES patches (a long panorama, or a large photo at size 0)."""
    h, w = img.shape[-2:]
    shorter = min(h, w)
    side = image_size if image_size and shorter > image_size else shorter
    patches = (h * side / shorter / patch_size) * (w * side / shorter / patch_size)
    if patches > MAX_PATCHES:
        side = side * (MAX_PATCHES / patches) ** 0.5
    return prepare(img, 0 if side == shorter else max(1, int(side)), patch_size)


@torch.no_grad()
def layer_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a [0, 1] image (3, h, w) cropped to whole patches: the [CLS] attention of every block,
    (layers, heads, grid_h, grid_w), and the PCA colours of every block's patch features (final norm
    applied, as `get_intermediate_layers` does), (layers, grid_h, grid_w, 3) in [0, 1].

    >>> attn, pca = layer_maps(model, torch.rand(3, 32, 32))   # a ViT with patch 8: 4 x 4 grid
    """
    device = next(model.parameters()).device
    normalised = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    gh, gw = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    tokens = model.prepare_tokens(normalised[None].to(device))
    attention, colours = [], []
    for block in model.blocks:
        # the attention weights need the block's slow path; the tokens go on through its fast one
        attn = block(tokens, return_attention=True)[0]  # heads, T, T
        attention.append(attn[:, 0, 1:].reshape(-1, gh, gw).float().cpu())
        tokens = block(tokens)
        colours.append(pca_rgb(model.norm(tokens)[0, 1:].float().cpu(), gh, gw))
    return torch.stack(attention), torch.stack(colours)


def pca_rgb(features: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """(patches, dim) -> (grid_h, grid_w, 3): the first three principal components, each scaled to [0, 1]
    over the image (a component the features do not have stays 0). Signs are fixed so that each
    component's largest value is positive, so the colours do not flip between calls."""
    centred = features - features.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = centred @ vh[:3].T
    comps = comps * torch.where(comps.max(0).values.abs() >= comps.min(0).values.abs(), 1.0, -1.0)
    lo, hi = comps.min(0).values, comps.max(0).values
    scaled = (comps - lo) / (hi - lo).clamp_min(1e-12)
    rgb = torch.zeros(len(features), 3)
    rgb[:, :scaled.shape[1]] = scaled
    return rgb.reshape(grid_h, grid_w, 3)


def png_data_url(pixels: np.ndarray) -> str:
    """uint8 (H, W), (H, W, 3) or (H, W, 4) -> a `data:image/png;base64,...` URL."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def image_pixels(x: torch.Tensor) -> np.ndarray:
    """[0, 1] float (3, H, W) -> uint8 (H, W, 3)."""
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def mask_shade(mask: torch.Tensor) -> np.ndarray:
    """A bool patch mask -> RGBA: clear where kept, dark where left out (laid over the image)."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(mask.numpy(), 0, MASK_SHADE)
    return rgba


def render_layer(attention: torch.Tensor, colours: torch.Tensor, threshold: float) -> dict:
    """One block's maps as page-ready PNGs: per head its heat map, its mass mask (`mass_mask`, the one
    `dinokit attention` draws) and the mask's share of the patches; the heads' mean; the PCA colours."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    masks = mass_mask(attention, threshold)
    heads = [{"heat": png_data_url(heat_map(a.numpy())), "mask": png_data_url(mask_shade(m)),
              "fraction": round(float(m.float().mean()), 6)} for a, m in zip(attention, masks)]
    return {"threshold": threshold, "heads": heads,
            "mean": png_data_url(heat_map(attention.mean(0).numpy(), "inferno")),
            "pca": png_data_url((colours.numpy() * 255).round().astype(np.uint8))}
