"""Model: a Hub or local image classifier with a new head, or a small ViT built offline; the optimizer."""

import copy
import difflib
import os

import torch

from vitfood import adapt, onnxfile
from vitfood.common import UserError, autocast, first_line, keep_compiled_kernels
from vitfood.fsdp import SHARDED_DIR, is_sharded, is_sharded_checkpoint
from vitfood.hub import hub_error, is_path
from vitfood.seal import check_intact

# Named ViT shapes built from ViTConfig without any download. vit-tiny/small/base are the
# ViT-Ti/S/B /16 shapes; vit-micro is for tests.
NAMED = {
    "vit-micro": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=64),
    "vit-tiny": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768, patch_size=16, image_size=224),
    "vit-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=16, image_size=224),
    "vit-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16, image_size=224),
    "vit-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, patch_size=16, image_size=224),
    "vit-huge": dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120, patch_size=14, image_size=224),
}


def hub_model(name):
    """`name` when it is a Hub model id, else None (a local folder or a named config). A near miss of a named
    config (vit-tinny) is one line that names it."""
    if name in NAMED or is_path(name):
        return None
    close = difflib.get_close_matches(name, NAMED, n=1, cutoff=0.8)
    if close and "/" not in name:
        raise UserError(f"--model {name}: no such named config; did you mean {close[0]}? (named configs: "
                        f"{', '.join(NAMED)}; or a Hub id, or a local folder)")
    return name


def resolve_attn(attn, device):
    if attn != "auto":
        return attn
    return "sdpa" if device is not None and torch.device(device).type == "cuda" else "eager"


def load_processor(cfg):
    """The image processor of --model at --image-size: what the transforms are built from (before the model, so
    that the loader's workers can start while the model is built)."""
    if cfg.model in NAMED:
        from transformers import ViTImageProcessor
        s = named_shape(cfg)["image_size"]
        return ViTImageProcessor(size={"height": s, "width": s}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    _, processor = from_pretrained(cfg.model, None, trust_remote_code=cfg.trust_remote_code)
    return adapt.resize_processor(processor, cfg.image_size) if cfg.image_size else processor


def named_shape(cfg):
    """The ViTConfig fields of a named shape, at --image-size."""
    shape = dict(NAMED[cfg.model])
    if cfg.image_size:
        if cfg.image_size % shape["patch_size"]:
            raise UserError(f"--image-size {cfg.image_size} must be a multiple of the patch size {shape['patch_size']}")
        shape["image_size"] = cfg.image_size
    return shape


def build_model(cfg, class_names, device=None, multi_label=False, processor=None):
    """(model, image_processor) with a classification head for `class_names`, as it trains (frozen, LoRA,
    checkpointed: adapt.prepare); `device` resolves --attn auto, and a named shape is built there (a random
    initialisation on the GPU takes a fraction of the CPU's time). `multi_label`: the config says so, and
    transformers then computes binary cross-entropy and its pipeline applies a sigmoid. `processor`: the one
    load_processor gave, else it is loaded here."""
    attn = resolve_attn(cfg.attn, device)
    from transformers import ViTConfig, ViTForImageClassification

    id2label = {i: name for i, name in enumerate(class_names)}
    label2id = {name: i for i, name in id2label.items()}
    problem = "multi_label_classification" if multi_label else None  # None: softmax, as transformers infers it
    if cfg.model in NAMED:
        if cfg.drop_path:
            raise UserError(f"--drop-path: {cfg.model} is a ViTConfig, which has no stochastic depth (no drop_path_rate)")
        config = ViTConfig(**named_shape(cfg), num_labels=len(class_names), id2label=id2label, label2id=label2id,
                           problem_type=problem)
        config._attn_implementation = attn
        with torch.device(device or "cpu"):
            model = ViTForImageClassification(config)
        return adapt.prepare(model, cfg), processor or load_processor(cfg)

    extra = {}
    if cfg.drop_path:
        config = read_config(cfg.model, cfg.trust_remote_code)  # None: from_pretrained below says what is wrong
        if config is not None and not hasattr(config, "drop_path_rate"):
            raise UserError(f"--drop-path: {type(config).__name__} has no stochastic depth (no drop_path_rate)")
        extra["drop_path_rate"] = cfg.drop_path
    model, processor = from_pretrained(cfg.model, attn, trust_remote_code=cfg.trust_remote_code, processor=processor,
                                       num_labels=len(class_names), id2label=id2label, label2id=label2id,
                                       problem_type=problem, ignore_mismatched_sizes=True, **extra)
    if cfg.image_size:
        model, processor = adapt.resized(model, processor, cfg.image_size)
    return adapt.prepare(model, cfg), processor


def skeleton(cfg, num_labels=2):
    """The model's modules without weights (on the meta device), from its config alone, for the checks that
    come before any data is read; None where the config does not say (those checks then come at load)."""
    import transformers
    config = transformers.ViTConfig(**NAMED[cfg.model]) if cfg.model in NAMED else read_config(cfg.model,
                                                                                                cfg.trust_remote_code)
    if config is None:
        return None
    try:
        config.num_labels = num_labels
        with torch.device("meta"):
            return transformers.AutoModelForImageClassification.from_config(config,
                                                                             trust_remote_code=cfg.trust_remote_code)
    except Exception:
        return None


def read_config(name, trust_remote_code=False):
    """A Hub or local model's config alone (no weights), or None where it cannot be read (loading the model
    then says why, in one line)."""
    from transformers import AutoConfig
    if onnxfile.is_onnx(name):  # an export's config.json is beside its .onnx file
        name = os.path.dirname(os.path.abspath(os.path.expanduser(name)))
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name), trust_remote_code=trust_remote_code)
    except Exception:
        return None


def from_pretrained(name, attn, trust_remote_code=False, processor=None, **model_kwargs):
    """(model, image_processor) from a Hub id or a local folder; one clear line when it cannot be loaded.
    `attn` None: the processor alone (model None); `processor`: that one instead of the folder's."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification
    from transformers.utils import logging
    downloads = not are_progress_bars_disabled()
    logging.disable_progress_bar()  # no "Loading weights" bar at every load
    if downloads:
        enable_progress_bars()  # downloads keep theirs
    local = is_path(name)
    path = os.path.expanduser(name)
    if local and not os.path.isdir(path):
        raise UserError(f"model path {name} does not exist (or is not a folder)")
    if local and os.path.isfile(os.path.join(path, "adapter_config.json")) and \
            not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{name} holds a LoRA adapter, not a whole model (a LoRA run's checkpoints hold what trains): "
                        "use the run's model/ folder, where the adapters are merged, or resume the run to export one")
    if local:
        check_intact(path)  # a file changed since it was written: named, never loaded
    sharded = local and is_sharded_checkpoint(path)  # an --fsdp run's checkpoint: its config, then its shards
    if sharded and model_kwargs:  # a new head, labels or drop path for training: only from a whole model
        raise UserError(f"{name} is an --fsdp run's checkpoint (sharded weights): give the run's model/ folder as "
                        "--model, or --resume it")
    try:
        processor = processor or AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        if attn is None:
            model = None
        elif sharded:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            model = AutoModelForImageClassification.from_config(config, attn_implementation=attn,
                                                                trust_remote_code=trust_remote_code)
        else:
            model = AutoModelForImageClassification.from_pretrained(
                path, attn_implementation=attn, trust_remote_code=trust_remote_code, **model_kwargs)
    except UserError:
        raise
    except Exception as e:
        if local:
            raise UserError(f"cannot load model folder {name}: {first_line(e)}")
        raise hub_error("model", name, e)
    if sharded and model is not None:
        load_sharded_weights(model, path)
    return model, processor


def load_for_inference(name, device, attn="auto"):
    """(model in eval mode on `device`, processor), with the attention training uses by default there. An .onnx
    file (vitfood.export's) is run by onnxruntime on the CPU, with the processor of the folder it is in."""
    if onnxfile.is_onnx(name):
        return onnxfile.load(name)
    model, processor = from_pretrained(name, resolve_attn(attn, device))
    return model.to(device).eval(), processor


def make_optimizer(model, cfg):
    """Fused AdamW, on CPU and CUDA alike: it skips a non-finite step on the device (steps.optimizer_step),
    and on the CPU it measured 7x faster than the foreach kernels (bench/README.md). No weight decay on
    1-D tensors (biases, norm weights), whatever their names."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.ndim >= 2], weight_decay=cfg.weight_decay),
              dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)]
    if cfg.layer_decay < 1:  # per layer and decay: lr x layer_decay^(depth from the top)
        ids, top = layer_ids(model)
        by_layer = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                decay = p.ndim >= 2
                by_layer.setdefault((ids[name], decay), dict(
                    params=[], weight_decay=cfg.weight_decay if decay else 0.0,
                    lr=cfg.lr * cfg.layer_decay ** (top - ids[name])))["params"].append(p)
        groups = list(by_layer.values())
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


LAYERED = ("vit", "deit", "beit", "dinov2", "data2vec-vision")  # families with one list of transformer blocks


def layer_ids(model):
    """({parameter name: layer}, top layer) for layer-wise lr decay: 0 for the embeddings, i + 1 for block i,
    top = blocks + 1 for what follows them (final norm, pooler, head)."""
    if model.config.model_type not in LAYERED:
        raise UserError(f"--layer-decay applies to the ViT family (ViT, DeiT, BEiT, DINOv2) by block index; "
                        f"{type(model).__name__} is not one")
    prefix, blocks = max(((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)),
                         key=lambda item: len(item[1]))
    ids, after = {}, False
    for name, _ in model.named_parameters():
        if name.startswith(prefix + "."):
            ids[name], after = int(name[len(prefix) + 1:].split(".")[0]) + 1, True
        else:
            ids[name] = len(blocks) + 1 if after else 0
    return ids, len(blocks) + 1


def make_scheduler(optimizer, warmup_steps, max_steps, freeze_steps=0, freeze_scale=1.0):
    """Linear warm-up from 0, then linear decay to 0 at max_steps (the Trainer's default schedule). With
    `freeze_steps`, the head trains alone first on a schedule of its own, at `freeze_scale` times the rate: a
    tenth of the phase warming up, then down to 0 at the switch; the configured schedule follows over the rest."""
    def factor(step):
        if step < freeze_steps:
            warm = max(1, freeze_steps // 10)
            return freeze_scale * (step / warm if step < warm else (freeze_steps - step) / max(1, freeze_steps - warm))
        step, total = step - freeze_steps, max_steps - freeze_steps
        if step < warmup_steps:
            return step / warmup_steps
        return max(0.0, (total - step) / max(1, total - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def vit_flops_per_image(config, training=True):
    """Analytic matmul FLOPs (2 per multiply-add) of one image through a ViT; x3 for training."""
    d, L, f = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    p, c = config.patch_size, config.num_channels
    n = (config.image_size // p) ** 2 + 1  # patches + [CLS]
    patch_embed = (n - 1) * d * c * p * p
    per_layer = 4 * n * d * d + 2 * n * n * d + 2 * n * d * f  # qkv+out proj, scores+weighted sum, MLP
    head = d * config.num_labels
    forward = 2 * (patch_embed + L * per_layer + head)
    return 3 * forward if training else forward


def compiled(model, device, world=1, graphed=False):
    """torch.compile for training. On one GPU, mode "reduce-overhead": the forward and backward replay as
    CUDA graphs, one launch instead of hundreds, which a small batch is bound by; inside a graph of the whole
    step (`graphed`: steps.GraphedStep), the default mode. Under DDP (whose gradient hooks a graph cannot hold)
    and on the CPU, the default mode (fused kernels)."""
    mode = "reduce-overhead" if device.type == "cuda" and world == 1 and not graphed else None
    keep_compiled_kernels()
    return torch.compile(model, mode=mode)


def unwrap(model):
    """The plain model behind torch.compile (and DDP) wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def for_inference(model, precision, device, keep=True):
    """(model, context) to run inference with: the plain model (no DDP, whose forward may communicate; no
    compile). In bf16 the weights themselves are cast (on a copy when `keep`, so training keeps its fp32
    weights): no gradients or optimizer need fp32 masters, and autocast re-casting every weight and
    activation on every call cost about 20% of forward time on the CPU (bench/README.md). fp16 keeps
    autocast, whose fp32 islands guard against overflow."""
    model = unwrap(model)
    if precision != "bf16" or is_sharded(model):  # a sharded model's weights are gathered as bf16 by FSDP itself
        return model, autocast(precision, device)
    net = copy.deepcopy(model) if keep else model
    # ViT casts pixel_values to its weights' dtype itself; BEiT, Swin, ConvNeXt and ResNet do not
    net.register_forward_pre_hook(_bf16_input, with_kwargs=True)
    return net.to(torch.bfloat16).eval(), autocast("fp32", device)


def _bf16_input(module, args, kwargs):
    return tuple(a.to(torch.bfloat16) if torch.is_floating_point(a) else a for a in args), \
        {k: v.to(torch.bfloat16) if k == "pixel_values" else v for k, v in kwargs.items()}


def load_weights(model, path):
    """Load a checkpoint folder's weights into `model`; a clear error when they are another model's."""
    import transformers
    if not os.path.isdir(path):  # never a Hub lookup for a local folder that is gone
        raise UserError(f"checkpoint {path} does not exist")
    if adapt.is_lora(model):  # a LoRA checkpoint holds what trains; the rest is rebuilt as it was loaded
        return adapt.load_adapter(model, path)
    if is_sharded_checkpoint(path):  # an --fsdp run's: its shards, into a sharded or a plain model
        return load_sharded_weights(model, path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # we report problems ourselves, in one line
    try:
        loaded, info = type(model).from_pretrained(path, output_loading_info=True)
    except Exception as e:
        raise UserError(f"checkpoint {path}: cannot load its weights ({first_line(e, 160)})")
    finally:
        transformers.logging.set_verbosity(verbosity)
    own, theirs = model.state_dict(), loaded.state_dict()
    missing = info["missing_keys"] or sorted(set(own) ^ set(theirs))
    wrong = [k for k in own if k in theirs and theirs[k].shape != own[k].shape]
    if missing or wrong:
        what = f"{sorted(missing)[0]} differs" if missing else \
            f"{wrong[0]} has shape {tuple(theirs[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}"
        raise UserError(f"checkpoint {path} is from another model or data set ({what})")
    model.load_state_dict(theirs)


def load_sharded_weights(model, path, optimizer=None):
    """An --fsdp checkpoint's weights (and with `optimizer` its state) into `model`; one line when they are
    another model's."""
    from vitfood import fsdp
    try:
        fsdp.load(path, model, optimizer)
    except Exception as e:
        raise UserError(f"checkpoint {path}: cannot load its {SHARDED_DIR}/ weights (from another model or data set?): "
                        f"{first_line(e, 160)}") from None
