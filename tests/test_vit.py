"""The ViT's [CLS] path: `forward` runs the last block for [CLS] alone, and must give what the full token
path gives, values and gradients, with stochastic depth drawing the same samples. Position embeddings: the
paper's resize for the patch stem, any image size for the conv stems. The student's random token subset."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dinokit.models.vit import VisionTransformer, keep_random_tokens


def random_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(**kw)
    for p in model.parameters():  # away from the init's zeros and ones, so that every term counts
        p.data.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("kw", [
    dict(img_size=20, patch_size=4, embed_dim=48, depth=3, num_heads=4, stem="conv"),
    dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, stem="conv-full"),
    dict(img_size=32, patch_size=8, embed_dim=36, depth=1, num_heads=3, qkv_bias=False),
])
def test_cls_only_last_block_matches_all_tokens(kw):
    model = random_vit(**kw).double()
    x = torch.randn(5, 3, 24, 24, dtype=torch.float64)  # not the model's size: interpolated positions too
    fast = model(x)
    full = model.forward_features(x)[:, 0]
    torch.testing.assert_close(fast, full, rtol=0, atol=1e-12)

    grads = []
    for out in (lambda: model(x), lambda: model.forward_features(x)[:, 0]):
        model.zero_grad()
        (out() * torch.linspace(-1, 1, fast.shape[-1], dtype=torch.float64)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-10, msg=name)


def test_cls_only_keeps_stochastic_depth_draws():
    model = random_vit(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5).train()
    x = torch.randn(16, 3, 16, 16)
    torch.manual_seed(1)
    fast = model(x)
    torch.manual_seed(1)
    full = model.forward_features(x)[:, 0]
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(model(x), fast)  # samples were dropped: other draws, other outputs


def test_conv_stem_layouts():
    """`conv` keeps the layout earlier runs saved (their checkpoints load); `conv-full` adds a full-resolution
    convolution in a module of its own and widens the stride-2 ones up to the embedding width."""
    def shapes(stem):
        model = VisionTransformer(img_size=20, patch_size=4, embed_dim=96, depth=1, num_heads=4, stem=stem)
        return {k: tuple(v.shape) for k, v in model.patch_embed.state_dict().items() if k.endswith("weight")}
    assert shapes("conv") == {"stem.0.weight": (24, 3, 3, 3), "stem.2.weight": (48, 24, 3, 3),
                              "proj.weight": (96, 48, 1, 1)}
    assert shapes("conv-full") == {"full.0.weight": (16, 3, 3, 3), "stem.0.weight": (48, 16, 3, 3),
                                   "stem.2.weight": (96, 48, 3, 3), "proj.weight": (96, 96, 1, 1)}
    assert shapes("conv-full-relu") == shapes("conv-full")  # the activation alone differs

    def activations(stem):
        model = VisionTransformer(img_size=20, patch_size=4, embed_dim=96, depth=1, num_heads=4, stem=stem)
        return [type(m).__name__ for m in model.patch_embed.modules() if isinstance(m, (nn.GELU, nn.ReLU))]
    assert activations("conv-full") == ["GELU"] * 3 and activations("conv-full-relu") == ["ReLU"] * 3
    with pytest.raises(ValueError, match="stem must be"):
        VisionTransformer(img_size=20, patch_size=4, embed_dim=96, depth=1, num_heads=4, stem="conv2")


def reference_interpolate_pos_encoding(self, x, w, h):
    """facebookresearch/dino vision_transformer.py, verbatim but for `self.patch_embed.patch_size` (its
    PatchEmbed's attribute) and `nn.functional` (F); called as it calls it, with (height, width) as (w, h)."""
    npatch = x.shape[1] - 1
    N = self.pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return self.pos_embed
    class_pos_embed = self.pos_embed[:, 0]
    patch_pos_embed = self.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // self.patch_embed.patch_size
    h0 = h // self.patch_embed.patch_size
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode='bicubic',
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("h, w", [(32, 32), (33, 32), (32, 39), (40, 24), (8, 8), (15, 100), (64, 64)])
def test_patch_stem_positions_are_the_papers(h, w):
    """Non-multiples of the patch included, and the native grid of a non-square image, which the paper's
    code still resizes (by its +0.1 scale factor: not the identity)."""
    model = random_vit(img_size=32, patch_size=8, embed_dim=36, depth=1, num_heads=3).double()
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    tokens = torch.cat((model.cls_token.expand(2, -1, -1), model.patch_embed(x)), dim=1)
    assert tokens.shape[1] == 1 + math.prod(model.grid(h, w)) == 1 + (h // 8) * (w // 8)
    expected = reference_interpolate_pos_encoding(model, tokens, h, w).expand(2, -1, -1)
    torch.testing.assert_close(model.prepare_tokens(x) - tokens, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("stem", ["conv", "conv-full", "conv-full-relu"])
def test_conv_stem_takes_any_image_size(stem):
    """A conv stem pads: ceil(side / patch) tokens a side. The position embeddings are resized to that
    grid (the paper's resize, for the image padded to whole patches), so no size crashes."""
    model = random_vit(img_size=20, patch_size=4, embed_dim=32, depth=2, num_heads=2, stem=stem).eval()
    for h, w in [(1, 1), (3, 3), (7, 50), (21, 21), (22, 22), (10, 300), (17, 20), (16, 16), (20, 20)]:
        x = torch.randn(2, 3, h, w)
        gh, gw = math.ceil(h / 4), math.ceil(w / 4)
        assert model.grid(h, w) == (gh, gw)
        tokens = torch.cat((model.cls_token.expand(2, -1, -1), model.patch_embed(x)), dim=1)
        assert tokens.shape == (2, 1 + gh * gw, 32), (h, w)  # the grid the stem makes
        expected = reference_interpolate_pos_encoding(model, tokens, gh * 4, gw * 4)  # the padded image's
        torch.testing.assert_close(model.prepare_tokens(x) - tokens, expected.expand(2, -1, -1))
        assert model(x).shape == (2, 32)
        assert model.get_last_selfattention(x).shape == (2, 2, 1 + gh * gw, 1 + gh * gw)
        assert [t.shape for t in model.get_intermediate_layers(x, 2)] == [(2, 1 + gh * gw, 32)] * 2
    for side in (17, 18, 19, 20):  # the native 5 x 5 grid: the stored embeddings, unresized
        x = torch.randn(1, 3, side, side)
        torch.testing.assert_close(model.prepare_tokens(x)[:, 1:] - model.patch_embed(x), model.pos_embed[:, 1:])


def test_attention_on_a_cpu_is_explicit_in_bf16_and_over_few_tokens_and_matches_the_fused_kernel(monkeypatch):
    """On a CPU attention runs as two matrix products and a softmax in bf16 (PyTorch's fused kernel was up to
    12x slower there, BENCHMARKS.md) and over a few tokens in fp32 (up to 2x slower); over many tokens in fp32
    it is the fused kernel. Explicit and fused give the same fp32 values and gradients, and the bf16 result is
    the fp32 one to bf16's precision."""
    from dinokit.models import vit
    from dinokit.models.vit import EXPLICIT_MAX_TOKENS, explicit_attention
    few, many = torch.zeros(2, 3, EXPLICIT_MAX_TOKENS, 8), torch.zeros(2, 3, EXPLICIT_MAX_TOKENS + 1, 8)
    assert explicit_attention(few) and not explicit_attention(many)
    assert explicit_attention(many.bfloat16())
    model = random_vit(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=4)  # 17 tokens
    x = torch.randn(6, 3, 16, 16)
    runs = {}
    for explicit in (True, False):
        monkeypatch.setattr(vit, "explicit_attention", lambda k, explicit=explicit: explicit)
        model.zero_grad()
        out = model.forward_features(x)
        (out ** 2).sum().backward()
        runs[explicit] = out, {n: p.grad.clone() for n, p in model.named_parameters()}
    monkeypatch.undo()
    torch.testing.assert_close(runs[True][0], runs[False][0], rtol=1e-5, atol=1e-5)
    for n, g in runs[True][1].items():
        torch.testing.assert_close(g, runs[False][1][n], rtol=1e-4, atol=1e-5 * g.abs().max().item())
    model = random_vit(img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=4)
    for p in model.parameters():
        p.data.mul_(0.5)
    x = torch.randn(6, 3, 16, 16)
    reference = model.forward_features(x)
    (reference ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    def fused(*args, **kwargs):
        raise AssertionError("the fused kernel ran in bf16 on a CPU")
    monkeypatch.setattr(F, "scaled_dot_product_attention", fused)
    with torch.autocast("cpu", torch.bfloat16):
        low = model.forward_features(x)
    (low.float() ** 2).sum().backward()
    scale = reference.abs().max()
    assert (low.float() - reference).abs().max() < 0.03 * scale
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], rtol=0.1, atol=0.05 * grads[n].abs().max()), n


def test_keep_random_tokens_keeps_cls_and_a_different_subset_of_distinct_tokens_per_image():
    torch.manual_seed(0)
    tokens = torch.arange(4 * 26, dtype=torch.float).view(4, 26, 1).expand(-1, -1, 3)  # token id in every channel
    kept = keep_random_tokens(tokens, 0.6)
    assert kept.shape == (4, 1 + 15, 3)
    ids = kept[..., 0].long() - 26 * torch.arange(4)[:, None]  # each image's token indices
    assert (ids[:, 0] == 0).all()  # [CLS] first, always
    for row in ids[:, 1:]:
        assert len(set(row.tolist())) == 15 and row.min() >= 1 and row.max() <= 25  # distinct patch tokens
    assert torch.equal(kept[..., 1:], kept[..., :1].expand(-1, -1, 2))  # whole tokens move, not channels
    assert len({tuple(sorted(row.tolist())) for row in ids[:, 1:]}) > 1  # drawn per image
    assert keep_random_tokens(tokens, 0.01).shape[1] == 2  # at least one patch token


def test_keep_ratio_one_is_the_plain_forward_and_below_one_sees_fewer_tokens():
    model = random_vit(img_size=20, patch_size=4, embed_dim=48, depth=2, num_heads=4, stem="conv-full-relu").eval()
    x = torch.randn(3, 3, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x, keep_ratio=1.0), model(x))
        torch.manual_seed(1)
        dropped = model(x, keep_ratio=0.5)
        torch.manual_seed(1)
        # the same draw by hand: [CLS] and 12 of the 25 tokens through the blocks, the last for [CLS] alone
        tokens = keep_random_tokens(model.prepare_tokens(x), 0.5)
        for blk in model.blocks:
            tokens = blk(tokens)
        torch.testing.assert_close(dropped, model.norm(tokens)[:, 0])
    assert not torch.allclose(dropped, model(x))


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones_forward_and_backward():
    from dinokit.models.vit import drop_path
    torch.manual_seed(0)
    x = torch.randn(4000, 3, 5, requires_grad=True)
    out = drop_path(x, 0.25, training=True)
    scale = (out / x).detach()  # per sample: 0 (dropped) or 1 / 0.75 (kept)
    kept = scale[:, 0, 0] != 0
    assert torch.allclose(scale, scale[:, :1, :1].expand_as(scale))
    torch.testing.assert_close(scale[kept], torch.full_like(scale[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 0.03
    out.sum().backward()
    torch.testing.assert_close(x.grad, scale)
    assert drop_path(x, 0.25, training=False) is x and drop_path(x, 0.0, training=True) is x
