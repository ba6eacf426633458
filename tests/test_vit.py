"""The ViT's [CLS] path: `forward` runs the last block for [CLS] alone, and must give what the full token
path gives, values and gradients, with stochastic depth drawing the same samples."""
import pytest
import torch

from dinokit.models.vit import VisionTransformer


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
    with pytest.raises(ValueError, match="stem must be"):
        VisionTransformer(img_size=20, patch_size=4, embed_dim=96, depth=1, num_heads=4, stem="conv2")
