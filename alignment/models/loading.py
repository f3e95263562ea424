"""Loading the shared base model and tokenizer, and putting named LoRA adapters on it.

Every stage loads the base here, once per process, with the recipe's quantization. Roles (policy,
reference, reward, value) are named PEFT adapters on that one base: `attach_adapter` adds one,
trainable or frozen, from a config or from an earlier stage's saved adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alignment.models.chat_templates import apply_chat_template_choice
from alignment.models.precision import compute_dtype, torch_dtype
from alignment.names import ADAPTER_WEIGHTS, RESOLVED_RECIPE, SAVED_ADAPTER
from alignment.plugins import model_folder
from alignment.recipes.schema import LoraSettings, ModelConfig

logger = logging.getLogger(__name__)

SCORE_MODULE = "score"  # the classification head of AutoModelForSequenceClassification, saved by PEFT


def resolve_model_path(config: ModelConfig) -> str:
    """A plugin's model, a local folder (`~` expanded) or a hub id."""
    folder = model_folder(config.name_or_path)
    if folder is not None:
        return str(folder)
    return str(Path(config.name_or_path).expanduser()) if config.name_or_path.startswith("~") else config.name_or_path


def load_tokenizer(config: ModelConfig, chat_template: str) -> PreTrainedTokenizerBase:
    """The base's tokenizer with a pad token and the recipe's chat template set."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(config), revision=config.revision, trust_remote_code=config.trust_remote_code
    )
    apply_chat_template_choice(tokenizer, chat_template)
    if tokenizer.pad_token is None:
        # Many base models ship no pad token. Padding positions are masked, so any token works; one that
        # never ends a turn is preferred (the unknown token, a reserved pad token such as Llama 3's
        # <|finetune_right_pad_id|>), so that tools that find the last token by the pad id (transformers'
        # sequence classifiers) never mistake a real end of turn for padding.
        reserved = [token.content for token in tokenizer.added_tokens_decoder.values() if "pad" in token.content]
        tokenizer.pad_token = tokenizer.unk_token or (reserved[0] if reserved else tokenizer.eos_token)
    return tokenizer


def quantization_config(config: ModelConfig) -> BitsAndBytesConfig | None:
    quant = config.quantization
    if quant.mode == "none":
        return None
    if quant.mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(config.dtype),
    )


def device_map() -> dict[str, int | str] | None:
    """Each process puts its copy of the base on its own accelerator (accelerate's local process index)."""
    if torch.cuda.is_available():
        from alignment.distributed import process_state

        return {"": process_state().local_process_index}
    return None


def load_base_model(
    config: ModelConfig, gradient_checkpointing: bool = False, auto_class: type = AutoModelForCausalLM, **kwargs
) -> PreTrainedModel:
    """The base model, quantized as the recipe says, ready for adapters (k-bit preparation done).

    `auto_class` picks the head (the reward stage trains the same base as a one-label classifier).
    """
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = auto_class.from_pretrained(
        resolve_model_path(config),
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=torch_dtype(config.dtype),
        quantization_config=quantization_config(config),
        device_map=device_map(),
        **kwargs,
    )
    if config.quantization.mode != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_cpu_4bit_exact(model)
        keep_frozen_embeddings_in_compute_dtype(model, config)
    model.config.use_cache = not gradient_checkpointing
    return model


def keep_frozen_embeddings_in_compute_dtype(model: PreTrainedModel, config: ModelConfig) -> None:
    """Undoes k-bit preparation's float32 cast of the input embeddings and the LM head.

    `prepare_model_for_kbit_training` casts every unquantized weight to float32; the embeddings and the
    LM head are nearly all of them (188 of the 240 MiB of a 4-bit 134 M model with a 32k vocabulary,
    4 GiB in Llama 3 8B). Loaded in the 16-bit compute dtype and frozen, they gain nothing from float32,
    so they go back to it. Numerics stay as after the preparation: the embeddings' output is upcast, so
    the residual stream stays float32, and the LM head multiplies in the compute dtype, as autocast does
    (outside autocast its input is cast to that dtype). Float32 compute, or a float32 checkpoint, keeps both.
    """
    dtype = compute_dtype(config)
    if dtype == torch.float32 or torch_dtype(config.dtype) != dtype:
        return
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    embeddings.to(dtype)
    embeddings.register_forward_hook(lambda module, args, output: output.float())
    if head is not None:
        head.to(dtype)
        head.register_forward_pre_hook(_in_head_dtype)


def _in_head_dtype(module: torch.nn.Module, args: tuple) -> tuple | None:
    if torch.is_autocast_enabled(args[0].device.type):
        return None
    return (args[0].to(module.weight.dtype), *args[1:])


def keep_cpu_4bit_exact(model: torch.nn.Module) -> None:
    """Turns off bitsandbytes' CPU bf16 repacking of 4-bit weights for inference.

    On CPUs with AVX512-BF16, `Linear4bit` repacks its weights on the first no-grad eval forward and
    from then on runs them through a bfloat16 kernel that has no backward: training after any
    evaluation or rollout gets no gradient through the base's layers (only the adapters' own paths),
    the same input scores differently in eval and training, float32 recipes lose their precision,
    and layers whose output size is not a multiple of 32 fail an assertion (stories260k's MLP).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        bias=settings.bias,
        modules_to_save=settings.modules_to_save,
        layers_to_transform=settings.layers_to_transform,
        task_type="CAUSAL_LM",
    )


def attach_adapter(
    model: PreTrainedModel | PeftModel,
    name: str,
    settings: LoraSettings | None = None,
    from_path: str | Path | None = None,
    trainable: bool = True,
) -> PeftModel:
    """Adds the named adapter to the one base: new (from `settings`) or loaded from a saved stage.

    Returns the PeftModel that holds every adapter. A frozen adapter has requires_grad off on all its
    weights; PEFT's `set_adapter` would flip them back on, so callers switch roles with
    `use_adapter` below, which leaves requires_grad alone.
    """
    if from_path is not None and is_classifier_adapter_onto_causal_lm(model, from_path):
        model = attach_lora_of_classifier(model, name, from_path, trainable)  # a reward model's LoRA, on a causal LM
    elif from_path is not None:
        if isinstance(model, PeftModel):
            model.load_adapter(str(from_path), adapter_name=name, is_trainable=trainable)
        else:
            model = PeftModel.from_pretrained(model, str(from_path), adapter_name=name, is_trainable=trainable)
    else:
        if settings is None:
            raise ValueError(f"adapter '{name}': give LoRA settings or a saved adapter to load")
        if isinstance(model, PeftModel):
            model.add_adapter(name, lora_config(settings))
        else:
            model = get_peft_model(model, lora_config(settings), adapter_name=name)
    for parameter_name, parameter in model.named_parameters():
        if f".{name}." in parameter_name:
            parameter.requires_grad_(trainable)
    return model


def split_reward_adapter(stage_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A reward stage's saved adapter as (LoRA weights, `score` weights by their names inside the head)."""
    marker = f".{SCORE_MODULE}."
    weights = load_file(str(Path(stage_dir) / ADAPTER_WEIGHTS))
    head = {key.split(marker, 1)[1]: value for key, value in weights.items() if marker in key}
    if not head:
        raise FileNotFoundError(
            f"{stage_dir}: its adapter holds no '{SCORE_MODULE}' layer; point at a reward stage's output folder"
        )
    return {key: value for key, value in weights.items() if marker not in key}, head


def attach_lora_of_classifier(
    model: PreTrainedModel | PeftModel, name: str, stage_dir: str | Path, trainable: bool
) -> PeftModel:
    """The LoRA weights of a sequence-classification adapter as adapter `name` of a causal-LM model: the
    same decoder paths, with the task type and the saved head left out (PEFT would otherwise wrap the
    causal LM as a classifier)."""
    lora_weights, _ = split_reward_adapter(stage_dir)
    config = LoraConfig.from_pretrained(str(stage_dir))
    config.task_type, config.modules_to_save, config.inference_mode = "CAUSAL_LM", None, not trainable
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
    else:
        model = get_peft_model(model, config, adapter_name=name)
    result = set_peft_model_state_dict(model, lora_weights, adapter_name=name)
    missing = [key for key in result.missing_keys if f".{name}." in key and "lora_" in key]
    if result.unexpected_keys or missing:
        raise RuntimeError(
            f"{stage_dir}: its adapter does not fit this base (missing {missing[:3]}, unexpected "
            f"{result.unexpected_keys[:3]}); a reward model only loads onto the base it was trained on"
        )
    return model


def is_classifier_adapter_onto_causal_lm(model: PreTrainedModel | PeftModel, stage_dir: str | Path) -> bool:
    """Whether a saved adapter was trained on a sequence-classifier (a reward stage's) and `model` is none."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return LoraConfig.from_pretrained(str(stage_dir)).task_type == "SEQ_CLS" and not hasattr(base, SCORE_MODULE)


def use_adapter(model: PeftModel, name: str) -> None:
    """Makes `name` the active adapter without touching which weights are trainable.

    PPO switches roles several times per step. PEFT's `set_adapter` walks every module of the model and
    marks the active adapter trainable; here its adapter layers and their weights are found once (per
    set of adapters) and only they are visited: the layers' active adapter is set, their weights'
    requires_grad put back as it was.
    """
    layers, parameters = _adapter_layers(model)
    if layers is None or any(layer.merged for layer in layers):  # PEFT's own walk handles these
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        model.set_adapter(name)
        for parameter_name, parameter in model.named_parameters():
            parameter.requires_grad_(parameter_name in trainable)
        return
    flags = [parameter.requires_grad for parameter in parameters]
    for layer in layers:
        layer.set_adapter(name)
    for parameter, flag in zip(parameters, flags, strict=True):
        parameter.requires_grad_(flag)
    model.active_adapter = model.base_model.active_adapter = name  # PeftModel and its LoraModel each keep one


def _adapter_layers(model: PeftModel) -> tuple[list | None, list[torch.nn.Parameter]]:
    """The model's LoRA layers and their weights, cached on the model until an adapter is added or
    removed; (None, []) when modules_to_save wrappers need PEFT's full `set_adapter`."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    key = tuple(sorted(model.peft_config))
    cached = getattr(model, "_alignment_adapter_layers", None)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    modules = list(model.modules())
    layers: list | None = [module for module in modules if isinstance(module, BaseTunerLayer)]
    if any(isinstance(module, AuxiliaryTrainingWrapper) for module in modules):
        layers = None
    parameters = [p for layer in layers or [] for p in layer.parameters() if p is not None]
    parameters = list({id(p): p for p in parameters}.values())
    model._alignment_adapter_layers = (key, layers, parameters)
    return layers, parameters


def load_stage_recipe(stage_dir: str | Path):
    """The resolved recipe a stage saved beside its adapter."""
    from alignment.recipes.load import load_recipe

    path = Path(stage_dir) / RESOLVED_RECIPE
    if not path.exists():
        raise FileNotFoundError(
            f"{stage_dir} is not a stage output folder (no recipe.yaml); point at runs/<run>/<stage>"
        )
    return load_recipe(path)


def load_trained_policy(stage_dir: str | Path) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """A trained stage's adapter on its base, with its saved tokenizer, ready to generate."""
    recipe = load_stage_recipe(stage_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(stage_dir))
    base = load_base_model(recipe.model)
    model = attach_adapter(base, SAVED_ADAPTER, from_path=stage_dir, trainable=False)
    model.eval()
    return model, tokenizer
