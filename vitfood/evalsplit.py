"""A trained model opened on an eval split: the one way vitfood.evaluate, vitfood.export and vitfood.audit read
a split, load a model and check the two against each other.

The rules, each in one place: the model and the data set must have the same classes, in any order (`class_order`
gives, for each of the data set's classes, the model's logit that scores it); a multi-label model reads a data
set's single labels as lists of one; and the model is multi-label exactly when the split's labels are lists.
"""

import dataclasses

from vitfood.common import UserError
from vitfood.model import read_config
from vitfood.sources import is_multi_label, load_splits

MULTI = "multi_label_classification"  # a transformers config's problem_type for a multi-label classifier


@dataclasses.dataclass
class EvalSplit:
    cfg: object  # the options the split was read with
    model: object
    processor: object
    eval_ds: object
    names: list  # the data set's classes, in its order
    model_names: list  # the model's, in the order of its logits
    multi: bool  # a multi-label model on multi-label data
    relabel: list  # relabel[i]: the model's logit for the data set's class i


def model_names(model):
    return [model.config.id2label[i] for i in range(model.config.num_labels)]


def class_order(model_names, names, what="the model"):
    """For each of the data set's classes (`names`), the index of the model's logit that scores it; one line when
    the two do not hold the same classes."""
    if sorted(names) != sorted(model_names):
        raise UserError(f"{what}'s {len(model_names)} labels ({', '.join(model_names[:5])}, ...) are not the data "
                        f"set's {len(names)} classes ({', '.join(names[:5])}, ...)")
    return [model_names.index(n) for n in names]


def open_eval(cfg, path, load, max_images=None):
    """The model at `path` on `cfg`'s eval split (the first `max_images` of it). `load(names, multi)` loads the
    model and its processor (`names` and `multi`: the data set's classes, and whether its labels are lists)."""
    if not cfg.multi_label and getattr(read_config(path), "problem_type", None) == MULTI:
        cfg = dataclasses.replace(cfg, multi_label=True)  # another data set's single labels: lists of one
    _, eval_ds, names = load_splits(cfg, log=lambda *args: None)
    if max_images:
        eval_ds = eval_ds.select(range(min(max_images, len(eval_ds))))
    data_multi = is_multi_label(eval_ds, cfg.label_column)
    model, processor = load(names, data_multi)
    own = model_names(model)
    relabel = class_order(own, names, path)
    multi = model.config.problem_type == MULTI
    if multi != data_multi:
        raise UserError(f"{path} is a {'multi' if multi else 'single'}-label classifier, and the data set's "
                        f"label column {cfg.label_column!r} holds {'one class' if multi else 'a list of classes'} per image")
    return EvalSplit(cfg, model, processor, eval_ds, names, own, multi, relabel)
