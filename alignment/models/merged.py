"""A plain copy of the base with one adapter merged in, to sample from.

Sampling runs the model once per new token, and through a 4-bit base with LoRA adapters every layer
of every step dequantizes its base weight and adds the adapter's two small matmuls. A plain model whose
weights are W + s·BA in the compute dtype does neither: the RL trainers that sample with vLLM do the
same (a merged copy of the policy's weights). PEFT's own `merge_adapter` would fold the adapter into
the 4-bit weights and re-quantize them, which is lossy and not undone exactly by `unmerge_adapter`,
so the copy is made here from the dequantized weights, and the shared base is never touched.

The copy's weights exist only inside `MergedCopy.weights`: made when a rollout starts (after the last
update, so they are the policy's current ones) and released when it ends, so the update phase's
memory peak does not grow. Log-probabilities are still taken by the policy's own passes; the copy only
picks the tokens, from the same distribution up to rounding in the compute dtype.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from peft.utils.integrations import dequantize_bnb_weight
from transformers import PreTrainedModel


class MergedCopy:
    """The base model's architecture with its weights on the meta device, filled on demand."""

    def __init__(self, model: PeftModel, dtype: torch.dtype):
        self.source, self.dtype = model.get_base_model(), dtype
        config = copy.deepcopy(self.source.config)
        config.__dict__.pop("quantization_config", None)  # a plain model: no bitsandbytes layers
        with torch.device("meta"):
            self.model: PreTrainedModel = type(self.source)._from_config(config, dtype=dtype)
        self.model.requires_grad_(False).eval()
        own_buffers = dict(self.model.named_buffers())
        for name, buffer in self.source.named_buffers():  # rotary frequencies and the like, computed at init
            name = _unwrapped_name(name)
            if name in own_buffers:
                owner, _, key = name.rpartition(".")
                self.model.get_submodule(owner).register_buffer(key, buffer, persistent=False)

    @contextlib.contextmanager
    def weights(self, adapter: str) -> Iterator[PreTrainedModel]:
        """The copy with the base's weights and `adapter` merged in, for the duration of the block."""
        device = next(self.source.parameters()).device
        self.model.generation_config = self.source.generation_config  # the stop tokens as the base has them now
        merged: dict[int, torch.nn.Parameter] = {}  # by the meta parameter's id: tied weights stay tied
        slots = [
            (module, key, parameter)
            for module in self.model.modules()
            for key, parameter in module._parameters.items()
            if parameter is not None
        ]
        names = {id(parameter): name for name, parameter in self.model.named_parameters(remove_duplicate=False)}
        try:
            for module, key, parameter in slots:
                if id(parameter) not in merged:
                    weight = self._merged_weight(names[id(parameter)], adapter).to(device, self.dtype)
                    merged[id(parameter)] = torch.nn.Parameter(weight, requires_grad=False)
                module._parameters[key] = merged[id(parameter)]
            yield self.model
        finally:
            for module, key, parameter in slots:
                module._parameters[key] = parameter  # back to meta: the merged weights are freed

    @torch.no_grad()
    def _merged_weight(self, name: str, adapter: str) -> torch.Tensor:
        """W (dequantized) + the adapter's ΔW for a LoRA layer's weight; the tensor itself otherwise."""
        owner, _, key = name.rpartition(".")
        module = self.source.get_submodule(owner)
        if isinstance(module, ModulesToSaveWrapper):
            saved = module.modules_to_save  # a ModuleDict: no .get
            module = saved[adapter] if adapter in saved else module.original_module  # noqa: SIM401
        if not isinstance(module, LoraLayer):
            return getattr(module, key).detach()
        base = module.get_base_layer()
        if key != "weight":
            return getattr(base, key).detach()
        weight = _dequantized(base).float()
        if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
            if module.use_dora.get(adapter, False):
                raise NotImplementedError(f"{name}: a DoRA adapter cannot be merged here; set merged_sampling: false")
            weight = weight + module.get_delta_weight(adapter).float()
        return weight


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    """A bitsandbytes layer's weight dequantized, any other layer's as it is. (PEFT's
    `dequantize_module_weight` also replaces a CPU layer's weight parameter, which the shared base must not see.)"""
    weight = layer.weight
    if type(weight).__name__ in ("Params4bit", "Int8Params"):
        return dequantize_bnb_weight(weight, state=getattr(layer, "state", None))
    return weight.detach()


def _unwrapped_name(name: str) -> str:
    """A buffer's name in the plain model: PEFT's wrapper modules removed from the path."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")
