"""What of a model trains, and at what size it sees images: --freeze-backbone, LoRA (through peft),
--gradient-checkpointing, and --image-size for a pretrained model (its position embeddings resized once,
at load). Every check here runs before any data is read."""

import math
import os

import torch

from vitfood.common import UserError

LORA_DEFAULT = ("q_proj", "v_proj")  # the attention's query and value projections (transformers 5's names)
ADAPTER = "adapter"  # <output-dir>/adapter: the LoRA adapter in peft's own format, beside the merged model/


def head_names(model):
    """The top-level modules outside the backbone: the classification head (`classifier` in every family).
    One line for a model whose backbone is not a top-level module of its own name (CLIP, SigLIP)."""
    children = [name for name, _ in model.named_children()]
    heads = [name for name in children if name != model.base_model_prefix]
    if model.base_model_prefix not in children or not heads:
        raise UserError(f"{type(model).__name__} does not keep its backbone ({model.base_model_prefix!r}) and its head "
                        f"apart as top-level modules ({', '.join(children)}): --freeze-backbone and LoRA cannot "
                        "tell what to train")
    return heads


def check(cfg):
    """Bad combinations, in one line each, before anything is loaded."""
    if cfg.freeze_backbone and cfg.lora_rank:
        raise UserError("--freeze-backbone and --lora-rank exclude each other: LoRA already freezes the backbone "
                        "(its adapters train); pick one")
    if cfg.lora_rank < 0:
        raise UserError(f"--lora-rank must be at least 1 (0: no LoRA), got {cfg.lora_rank}")
    if cfg.class_weights == "balanced" and cfg.sampler == "balanced":
        raise UserError("--class-weights balanced with --sampler balanced corrects the imbalance twice (a rare "
                        "class would weigh about n_max / n_min times too much); pick one")
    if cfg.lora_rank and not 0 <= cfg.lora_dropout < 1:
        raise UserError(f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}")
    if cfg.lora_rank and cfg.lora_alpha <= 0:
        raise UserError(f"--lora-alpha must be positive, got {cfg.lora_alpha}")
    if freezes_first(cfg) and (cfg.freeze_backbone or cfg.lora_rank):
        raise UserError(f"--freeze-{'steps' if cfg.freeze_steps else 'epochs'} trains the head alone, then the whole "
                        f"model; with --{'freeze-backbone' if cfg.freeze_backbone else 'lora-rank'} the backbone "
                        "never trains: pick one")
    if cfg.gradient_checkpointing and cfg.freeze_backbone:
        raise UserError("--gradient-checkpointing with --freeze-backbone: a frozen backbone keeps no activations "
                        "for the backward pass, so there is nothing to recompute")


def check_model(model, cfg):
    """What this model's family cannot do of what `cfg` asks, in one line; `model` may have no weights yet
    (built on the meta device from its config, before any data is read)."""
    if cfg.gradient_checkpointing and not model.supports_gradient_checkpointing:
        raise UserError(f"--gradient-checkpointing: {type(model).__name__} has no gradient checkpointing in "
                        "transformers")
    if cfg.freeze_backbone or cfg.lora_rank or freezes_first(cfg):
        head_names(model)
    if cfg.lora_rank:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UserError("--lora-rank needs the peft package: pip install 'vitfood[lora]' (or pip install peft)")
        lora_targets(model, cfg)
    if cfg.image_size and getattr(model.config, "patch_size", None) and not hasattr(model.config, "image_size"):
        raise UserError(f"--image-size: {type(model).__name__}'s config has no image_size to change (its vision "
                        "settings sit elsewhere); train at its own size")
    patch = getattr(model.config, "patch_size", None)
    if cfg.image_size and isinstance(patch, int) and cfg.image_size % patch:
        raise UserError(f"--image-size {cfg.image_size} must be a multiple of the patch size {patch}")


LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)  # what peft's LoRA adapts


def lora_targets(model, cfg):
    """The --lora-targets names (or the defaults), each naming at least one layer LoRA can adapt, none in the
    head (which trains fully)."""
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()] if cfg.lora_targets else list(LORA_DEFAULT)
    heads = head_names(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LORA_LAYERS) and n.split(".")[0] not in heads}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in layers.items() if isinstance(m, torch.nn.Linear)})
        what = "the default targets " if not cfg.lora_targets else ""
        raise UserError(f"--lora-targets: {what}{', '.join(missing)} name no Linear, Conv2d or Embedding layer of "
                        f"{type(model).__name__}'s backbone; its Linear layers are named {', '.join(linear)}")
    return targets


def prepare(model, cfg):
    """The model as it trains: gradient checkpointing, then a frozen backbone or LoRA adapters. Returns the
    model to train (a peft.PeftModel under LoRA)."""
    check_model(model, cfg)
    if cfg.gradient_checkpointing:
        # non-reentrant: no input that requires grad needed (frozen embeddings, LoRA), and the RNG is replayed
        kwargs = dict(use_reentrant=False)
        if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if cfg.freeze_backbone or cfg.lora_rank:
        # batch norm keeps running statistics (buffers, not weights): in a frozen backbone they stay as loaded,
        # as the weights do (and a LoRA checkpoint, which holds what trains, need not hold them)
        for module in getattr(model, model.base_model_prefix).modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.register_forward_pre_hook(_frozen_statistics)
    if cfg.freeze_backbone:
        heads = head_names(model)
        for name, p in model.named_parameters():
            p.requires_grad_(name.split(".")[0] in heads)
    if cfg.lora_rank:
        import peft
        config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=lora_targets(model, cfg),
                                 modules_to_save=head_names(model))  # the head trains fully
        model = peft.get_peft_model(model, config)
    return model


def freezes_first(cfg):
    """Whether the run trains the head alone before the whole model (--freeze-epochs, --freeze-steps)."""
    return bool(cfg.freeze_steps or cfg.freeze_epochs)


def freeze_steps(cfg, batches_per_epoch, max_steps):
    """The optimizer steps the head trains alone: --freeze-steps, or --freeze-epochs in steps; one line when
    that leaves the whole model no step to train."""
    steps = cfg.freeze_steps or math.ceil(cfg.freeze_epochs * batches_per_epoch / cfg.grad_accum_steps)
    if steps >= max_steps:
        raise UserError(f"--freeze-{'steps' if cfg.freeze_steps else 'epochs'}: the head would train alone for "
                        f"{steps} of the run's {max_steps} steps, leaving the whole model none")
    return steps


def backbone_trains(model, trains):
    """Let the backbone's parameters train, or not (the head always trains). Frozen ones get no gradient, and
    AdamW leaves a parameter without one alone: the optimizer holds every parameter from the start. Batch norm's
    running statistics still follow the batches while frozen, as in fastai."""
    heads = head_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(trains or name.split(".")[0] in heads)


def _frozen_statistics(module, args):
    module.train(False)  # normalizes with, and leaves, the loaded running statistics


def is_lora(model):
    return hasattr(model, "peft_config")


def merged(model):
    """The plain transformers model to export: LoRA's adapters merged into the base weights (so that
    transformers.pipeline loads it without peft), the trained head in place."""
    return model.merge_and_unload() if is_lora(model) else model


def load_adapter(model, path):
    """A LoRA checkpoint's weights (what trains: adapters and head) into `model`, exactly."""
    import peft
    from safetensors.torch import load_file
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise UserError(f"checkpoint {path} holds no LoRA adapter (adapter_model.safetensors); was it a LoRA run?")
    result = peft.set_peft_model_state_dict(model, load_file(file))
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"checkpoint {path} is from another model or LoRA setting "
                        f"({result.unexpected_keys[0]} is not in this one)")


def trainable(model):
    """(parameters that train, all parameters), counted."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def resized(model, processor, size):
    """`model` and `processor` for images of `size` px: every position table that depends on the patch grid
    (absolute position embeddings, relative position bias tables) interpolated to the new grid, the config
    and the processor saying `size`. One line where the family cannot change size this way."""
    config = model.config
    old = getattr(config, "image_size", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(old, (list, tuple)):
        old = old[0]
    if old is not None and patch and size % patch:
        raise UserError(f"--image-size {size} must be a multiple of the patch size {patch}")
    if old is not None and old != size:
        config.image_size = size
        fresh = type(model)(config)  # the shapes at the new size (weights overwritten below)
        state, own = model.state_dict(), fresh.state_dict()
        for key, value in own.items():  # the old weights; resized where the grid sets the shape
            if key in state and state[key].shape != value.shape:
                # index buffers (not floats): the fresh model computed them for its own grid
                state[key] = _resize_table(key, state[key], value.shape, type(model).__name__) \
                    if torch.is_floating_point(value) else value
            elif key not in state:
                state[key] = value
        fresh.load_state_dict({k: state[k] for k in own})
        model = fresh
    return model, resize_processor(processor, size)


def resize_processor(processor, size):
    """`processor` made to give images of `size` px (in place; returned): resize and crop scaled alike, so its
    crop ratio stays."""
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    now = dict(crop)["height"] if crop else next(iter(dict(processor.size).values()))
    if now != size:
        scale = size / now
        processor.size = {k: round(v * scale) for k, v in dict(processor.size).items()}
        if crop:
            processor.crop_size = {"height": size, "width": size}
    return processor


def _resize_table(key, value, shape, family):
    """A position table of the old grid, bicubically resized to `shape` (the new grid's)."""
    if key.endswith("position_embeddings") and value.ndim == 3:  # (1, extra + g*g, dim): [CLS] (and more) first
        n_old, n_new = value.shape[1], shape[1]
        extra = _extra_tokens(n_old, n_new)
        g_old, g_new = math.isqrt(n_old - extra), math.isqrt(n_new - extra)
        grid = value[:, extra:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
        grid = torch.nn.functional.interpolate(grid.float(), size=(g_new, g_new), mode="bicubic", align_corners=False)
        return torch.cat([value[:, :extra], grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(value.dtype)], 1)
    if key.endswith("relative_position_bias_table") and value.ndim == 2:  # ((2g-1)^2 + 3, heads): 3 for [CLS]
        extra = value.shape[0] - (math.isqrt(value.shape[0]) ** 2)
        s_old, s_new = math.isqrt(value.shape[0] - extra), math.isqrt(shape[0] - extra)
        grid = value[:value.shape[0] - extra].T.reshape(1, -1, s_old, s_old)
        grid = torch.nn.functional.interpolate(grid.float(), size=(s_new, s_new), mode="bicubic", align_corners=False)
        return torch.cat([grid.reshape(-1, s_new * s_new).T.to(value.dtype), value[value.shape[0] - extra:]])
    raise UserError(f"--image-size: {family} cannot change size here ({key} has shape {tuple(value.shape)} at the "
                    f"checkpoint's size and {tuple(shape)} at the new one)")


def _extra_tokens(n_old, n_new):
    """How many leading tokens ([CLS], DeiT's distillation token) precede the patch grid in both tables."""
    for extra in range(4):
        if math.isqrt(n_old - extra) ** 2 == n_old - extra and math.isqrt(n_new - extra) ** 2 == n_new - extra:
            return extra
    raise UserError(f"--image-size: position embeddings of {n_old} tokens are not a square grid")
