"""Image-classification families other than ViT, built from tiny random configs (no download)."""

import pytest
import torch
import transformers as t

from vitfood.model import for_inference

FAMILIES = {
    "vit": lambda: t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=8),
    "beit": lambda: t.BeitConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8),
    "swin": lambda: t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                 window_size=4),
    "convnext": lambda: t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, image_size=32),
    "resnet": lambda: t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_evaluates_in_bf16(family):
    """The bf16 eval copy casts the weights; only ViT casts its own input to them, so for_inference must."""
    torch.manual_seed(0)
    config = FAMILIES[family]()
    config.num_labels = 3
    model = t.AutoModelForImageClassification.from_config(config).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=images).logits
        net, amp = for_inference(model, "bf16", torch.device("cpu"))
        with amp:
            logits = net(pixel_values=images).logits
    assert logits.dtype == torch.bfloat16 and next(model.parameters()).dtype == torch.float32  # a copy was cast
    assert torch.allclose(logits.float(), expected, atol=0.1, rtol=0.1)
