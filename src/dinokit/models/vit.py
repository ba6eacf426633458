"""Vision Transformer as DINO uses it, with the reference code's parameter names.

An official DINO state dict loads into these modules with `strict=True`; outputs match the reference to
float precision (tests/test_parity.py). Attention runs through PyTorch's fused
`scaled_dot_product_attention` unless the attention weights themselves are asked for.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the residual branch of whole samples."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)  # one pass over x, forward and backward


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


# On a CPU in fp32, attention over at most this many tokens runs faster as explicit products (BENCHMARKS.md)
EXPLICIT_MAX_TOKENS = 64


def explicit_attention(k: torch.Tensor) -> bool:
    """Whether attention is faster as two matrix products and a softmax than through
    `scaled_dot_product_attention`, on a CPU (BENCHMARKS.md): in bf16 or fp16, where PyTorch's fused kernel,
    forward and backward, took 1.4x (785 tokens) to 12x (10 tokens) the time of the explicit products, which
    run on the CPU's bf16 matrix units; in fp32 over at most `EXPLICIT_MAX_TOKENS` keys (`k`: ..., tokens,
    dim), where the fused kernel took 1.1x (65 tokens) to 2x (10 tokens) their time forward and backward (it
    is the faster from about 200 tokens up, and without grad from about 50)."""
    return k.device.type == "cpu" and (k.dtype in (torch.bfloat16, torch.float16) or k.shape[-2] <= EXPLICIT_MAX_TOKENS)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, return_attention: bool = False, cls_only: bool = False):
        """Attention over `x` (B, N, C); with `cls_only`, the [CLS] token's output alone (B, 1, C): only its
        query is computed, against every token's key and value."""
        B, N, C = x.shape
        heads = (self.num_heads, C // self.num_heads)
        if cls_only:
            w, b = self.qkv.weight, self.qkv.bias
            q = F.linear(x[:, :1], w[:C], None if b is None else b[:C]).reshape(B, 1, *heads).transpose(1, 2)
            kv = F.linear(x, w[C:], None if b is None else b[C:]).reshape(B, N, 2, *heads)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = self.qkv(x).reshape(B, N, 3, *heads).permute(2, 0, 3, 1, 4).unbind(0)  # B, heads, N, dim
        if return_attention or explicit_attention(k):
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1, dtype=torch.float32).to(v.dtype)
            x = attn @ v
        else:
            attn = None
            x = F.scaled_dot_product_attention(q, k, v)
        x = self.proj(x.transpose(1, 2).reshape(B, q.shape[2], C))
        return x, attn


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, return_attention: bool = False, cls_only: bool = False):
        """The block's output tokens; with `cls_only`, the [CLS] token's alone (B, 1, dim)."""
        y, attn = self.attn(self.norm1(x), return_attention, cls_only)
        if return_attention:
            return attn
        x = (x[:, :1] if cls_only else x) + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # B, patches, dim


# name -> (a full-resolution convolution first, the activation after each convolution)
CONV_STEMS = {"conv": (False, nn.GELU), "conv-full": (True, nn.GELU), "conv-full-relu": (True, nn.ReLU)}
STEMS = ("patch", *CONV_STEMS)
FULL_RES_CHANNELS = 16  # the full-resolution stems' first convolution, at the image's own resolution


class ConvStem(nn.Module):
    """Patches from a stack of 3 x 3 stride-2 convolutions, then a 1 x 1 projection (Xiao et al. 2021,
    "Early convolutions help transformers see better"): the same token grid as a `patch_size` patchify
    (sides that are not multiples of it round up: the convolutions pad), with local image structure built
    in, so that a small ViT learns sooner. Not in the paper's code.

    `full_res=False` (`stem: conv`): widths doubling up to half the embedding width. `full_res=True`
    (`stem: conv-full`): a 3 x 3 convolution at full resolution first, and widths doubling up to the
    embedding width itself, as in Xiao et al.; strokes a pixel wide reach the tokens (docs/recipe.md).
    `act`: the activation after each convolution; `stem: conv-full-relu` takes Xiao et al.'s ReLU, which
    learned more per minute than GELU at small scale (docs/recipe.md). A state dict cannot show it.

    >>> [tuple(w.shape[:2]) for name, w in ConvStem(4, 3, 96, full_res=True).named_parameters() if "weight" in name]
    [(16, 3), (48, 16), (96, 48), (96, 96)]
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, full_res: bool = False,
                 act: type[nn.Module] = nn.GELU):
        super().__init__()
        n = int(math.log2(patch_size))
        if patch_size < 2 or 2 ** n != patch_size:
            raise ValueError(f"a convolutional stem needs a power-of-two patch size (got {patch_size})")
        self.patch_size = patch_size
        top = embed_dim if full_res else embed_dim // 2
        widths = [max(top >> (n - 1 - i), 8) for i in range(n)]  # doubling up to `top`
        first = FULL_RES_CHANNELS if full_res else in_chans  # what the stride-2 convolutions start from
        # its own module, so that a state dict's count of `stem.N` convolutions still gives the patch size
        self.full = nn.Sequential(nn.Conv2d(in_chans, first, kernel_size=3, padding=1), act()) \
            if full_res else nn.Identity()
        layers = []
        for a, b in zip([first] + widths[:-1], widths):
            layers += [nn.Conv2d(a, b, kernel_size=3, stride=2, padding=1), act()]
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(widths[-1], embed_dim, kernel_size=1)

    def forward(self, x):
        # channels-last: oneDNN's small convolutions run faster in it (the stem's forward and backward took
        # 6.4 ms against 8.8 for 64 crops of 20 px on the CPU), and the tokens come out contiguous
        x = self.stem(self.full(x.contiguous(memory_format=torch.channels_last)))
        return F.linear(x.permute(0, 2, 3, 1), self.proj.weight.flatten(1), self.proj.bias).flatten(1, 2)


class VisionTransformer(nn.Module):
    """ViT with a [CLS] token and learned absolute position embeddings for an `img_size` grid."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path_rate: float = 0.0, eps: float = 1e-6, stem: str = "patch"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)} ('patch': the paper's; got {stem!r})")
        self.img_size, self.patch_size, self.stem = img_size, patch_size, stem
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim) if stem == "patch" else \
            ConvStem(patch_size, in_chans, embed_dim, *CONV_STEMS[stem])
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth).tolist()  # deeper blocks drop more
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], eps) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)

    def arch(self) -> dict:
        """The constructor arguments that fix the parameter shapes (stored beside saved weights)."""
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=len(self.blocks), num_heads=self.num_heads,
                    mlp_ratio=self.blocks[0].mlp.fc1.out_features / self.embed_dim,
                    **({"stem": self.stem} if self.stem != "patch" else {}))

    def grid(self, h: int, w: int) -> tuple[int, int]:
        """The token grid (rows, columns) of an h x w image. A patchify makes s // p tokens a side; a conv
        stem's stride-2, padding-1 convolutions make ceil(s / 2) of s pixels each, so ceil(s / p)."""
        p = self.patch_size  # (s + p - 1) // p, not -(-s // p): traced to ONNX, integer division truncates
        return (h // p, w // p) if self.stem == "patch" else ((h + p - 1) // p, (w + p - 1) // p)

    def positions_size(self, h: int, w: int) -> tuple[int, int]:
        """The image size whose position embeddings an h x w image's tokens take: as given for a patchify
        (which drops a partial patch itself), padded to whole patches for a conv stem (the grid it makes)."""
        return (h, w) if self.stem == "patch" else tuple(g * self.patch_size for g in self.grid(h, w))

    def interpolate_pos_encoding(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        npatch, n = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if npatch == n and h == w:
            return self.pos_embed
        # The reference resizes with a scale factor nudged by 0.1 (not a target size); the same call
        # gives the same bicubic weights, which checkpoints trained with it expect.
        grid, dim = int(math.sqrt(n)), x.shape[-1]
        h0, w0 = h // self.patch_size + 0.1, w // self.patch_size + 0.1
        patch_pos = self.pos_embed[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(h0 / grid, w0 / grid), mode="bicubic")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def prepare_tokens(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                       mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (those where the bool `masks` (B, patches) is true swapped for `mask_token`), with
        [CLS] in front and position embeddings added."""
        B, _, h, w = x.shape
        h, w = self.positions_size(h, w)
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks[..., None], mask_token.to(x.dtype), x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        return x + self.interpolate_pos_encoding(x, h, w)

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None,
                         mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """All final-norm tokens: B, 1 + patches, dim."""
        x = self.prepare_tokens(x, masks, mask_token)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor, keep_ratio: float = 1.0) -> torch.Tensor:
        """The final-norm [CLS] token: B, dim. Nothing reads the last block's other tokens, so only [CLS]
        queries there: the same numbers, with that block's MLP and projections on one token, not all (a
        quarter of a depth-3 ViT's work; BENCHMARKS.md). `keep_ratio` < 1: the blocks see [CLS] and that
        share of each image's patch tokens, chosen at random (`keep_random_tokens`)."""
        x = self.prepare_tokens(x)
        if keep_ratio < 1:
            x = keep_random_tokens(x, keep_ratio)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.norm(self.blocks[-1](x, cls_only=True))[:, 0]

    def get_last_selfattention(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """Softmaxed attention weights of the last block: B, heads, tokens, tokens; with `cls_only` the [CLS]
        query's row alone (B, heads, 1, tokens): memory grows with the tokens, not with their square."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return self.blocks[-1](x, return_attention=True, cls_only=cls_only)

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-norm outputs (all tokens) of the last `n` blocks."""
        x = self.prepare_tokens(x)
        out = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out


def keep_random_tokens(tokens: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """[CLS] (the first token) and a random `keep_ratio` of the other tokens (at least one), drawn for each
    image, in their drawn order: their position embeddings are already added, so order does not matter. What
    the student sees of a view in MSN's and FLIP's masking: a harder view, and a cheaper step (BENCHMARKS.md).

    >>> keep_random_tokens(torch.randn(8, 1 + 25, 96), 0.6).shape
    torch.Size([8, 16, 96])
    """
    B, n, dim = tokens.shape
    keep = max(1, round((n - 1) * keep_ratio))
    chosen = torch.rand(B, n - 1, device=tokens.device).argsort(dim=1)[:, :keep] + 1
    return torch.cat((tokens[:, :1], tokens.gather(1, chosen[..., None].expand(-1, -1, dim))), dim=1)


def _init_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


VIT_SIZES = {  # name: (embed_dim, depth, heads); the one table of ViT sizes
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),  # not trained in the paper; its width tells ported weights' heads
}


def _vit(name: str, patch_size: int, **kwargs) -> VisionTransformer:
    dim, depth, heads = VIT_SIZES[name]
    return VisionTransformer(patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads, **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs) -> VisionTransformer:
    return _vit("vit_base", patch_size, **kwargs)
