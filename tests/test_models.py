"""The shared 4-bit base: what loading it promises the stages that train on it."""

from __future__ import annotations

import torch

from alignment.models.loading import attach_adapter, load_base_model, load_tokenizer
from alignment.recipes.load import validate_recipe

from conftest import minimal_recipe


def test_a_4bit_base_trains_with_the_same_gradients_after_an_evaluation_pass():
    """PPO and the stages' evaluations run the base in eval mode without gradients, then train it.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights on such a pass and from then on runs
    them through a kernel with no backward: the gradient stops at every base layer and the adapters
    of the earlier layers learn from a wrong signal. `load_base_model` keeps the exact path.
    """
    recipe = validate_recipe(
        minimal_recipe(model={"name_or_path": "toy", "quantization": {"mode": "4bit"}}, lora={"dropout": 0.0})
    )
    tokenizer = load_tokenizer(recipe.model, recipe.chat_template)
    model = attach_adapter(load_base_model(recipe.model), "policy", recipe.lora)
    for name, parameter in model.named_parameters():  # non-zero B, so every LoRA weight gets a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    batch = tokenizer(["reverse: abcde = edcba", "add: 3+4 = 7"], return_tensors="pt", padding=True)
    first_layer_lora = [
        parameter for name, parameter in model.named_parameters() if "layers.0." in name and "lora_A" in name
    ]

    def first_layer_gradients() -> list[torch.Tensor]:
        model.train()
        model.zero_grad()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return [parameter.grad.clone() for parameter in first_layer_lora]

    before = first_layer_gradients()
    model.eval()
    with torch.no_grad():
        model(**batch)
    after = first_layer_gradients()
    assert len(before) == 7 and all(gradient.abs().sum() > 0 for gradient in before)
    for gradient_before, gradient_after in zip(before, after, strict=True):
        torch.testing.assert_close(gradient_after, gradient_before, rtol=1e-5, atol=1e-7)
