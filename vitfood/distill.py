"""Knowledge distillation (--teacher): a trained model, frozen, scores each training batch beside the student, and
the student's loss mixes its usual term with one that pulls it towards the teacher's answers.

    loss = (1 - alpha) * hard + alpha * soft

`hard` is the run's usual loss (the labels, with label smoothing, class weights and mixup's mixed targets as
without a teacher). `soft`, with --distill soft (Hinton et al. 2015): KL(teacher || student) between the two
distributions tempered by T, times T^2 so that its gradients keep their size whatever T; multi-label: the binary
cross-entropy of the student's tempered scores against the teacher's tempered sigmoid scores, times T^2, the
mean over classes. With --distill hard (DeiT): the cross-entropy against the teacher's top class (multi-label:
its classes scored at least 0.5). The teacher sees the batch the student sees, mixed images included, brought to
its own size and normalisation on the device.
"""

import hashlib

import torch
import torch.nn.functional as F

from vitfood.common import UserError
from vitfood.evalsplit import MULTI, class_order
from vitfood.model import NAMED, for_inference, from_pretrained, read_config, resolve_attn, unwrap
from vitfood.images import transforms_for


def check_labels(name, class_names, multi_label):
    """One line unless the teacher `name` scores the data's classes (in any order) the way the run will: before its
    weights are loaded."""
    if name in NAMED:
        raise UserError(f"--teacher {name} is a named shape with random weights: give a trained model (a run's model/ "
                        "folder or checkpoint, or a Hub id)")
    config = read_config(name)
    if config is None:
        return  # loading it says why, in one line
    own = [config.id2label[i] for i in range(config.num_labels)]
    class_order(own, class_names, f"--teacher {name}")
    if (getattr(config, "problem_type", None) == MULTI) != multi_label:
        raise UserError(f"--teacher {name} is a {'multi' if not multi_label else 'single'}-label classifier and the "
                        f"run is {'multi' if multi_label else 'single'}-label")


def fingerprint(model):
    """The SHA-256 of the teacher's weights, in their order: what a resumed run checks it is given again."""
    digest = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Teacher:
    """The frozen teacher and the loss it adds. `__call__(images)`: its logits (float32, in the student's class
    order) for a batch normalised for the student."""

    def __init__(self, cfg, class_names, multi_label, device, precision, student_norm, student_size):
        model, processor = from_pretrained(cfg.teacher, resolve_attn("auto", device))
        self.name, self.digest = cfg.teacher, fingerprint(model)
        self.relabel = torch.tensor(class_order([model.config.id2label[i] for i in range(model.config.num_labels)],
                                                class_names, f"--teacher {cfg.teacher}"), device=device)
        self.net, self.amp = for_inference(model.to(device).eval().requires_grad_(False), precision, device, keep=False)
        _, eval_tf, (mean, std) = transforms_for(processor)
        self.size = tuple(eval_tf.crop)
        # x_teacher = x_student * scale + shift: undo the student's normalisation, apply the teacher's
        (ms, ss), (mt, st) = (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in student_norm), \
            (torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (mean, std))
        self.same = tuple(student_norm[0]) == tuple(mean) and tuple(student_norm[1]) == tuple(std)
        self.scale, self.shift = ss / st, (ms - mt) / st
        self.resize = self.size != tuple(student_size)
        self.multi, self.mode = multi_label, cfg.distill
        self.alpha, self.temperature = cfg.distill_alpha, cfg.distill_temperature

    @torch.no_grad()
    def __call__(self, images):
        if not self.same:
            images = images * self.scale + self.shift
        if self.resize:
            images = F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        with self.amp:
            logits = self.net(pixel_values=images).logits
        return logits.float()[:, self.relabel]

    def loss(self, student, teacher, hard):
        """(the loss, summed over the batch; its (soft, hard) terms, detached). `student`, `teacher`: float32 logits;
        `hard`: the run's usual loss of the batch, summed."""
        if self.mode == "hard":
            if self.multi:
                soft = F.binary_cross_entropy_with_logits(student, (teacher >= 0).float(), reduction="sum")
                soft = soft / student.shape[1]
            else:
                soft = F.cross_entropy(student, teacher.argmax(-1), reduction="sum")
        else:
            t = self.temperature
            if self.multi:
                soft = F.binary_cross_entropy_with_logits(student / t, torch.sigmoid(teacher / t), reduction="sum")
                soft = soft * t * t / student.shape[1]
            else:
                soft = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), reduction="sum",
                                log_target=True) * t * t
        total = (1 - self.alpha) * hard + self.alpha * soft
        return total, torch.stack([soft.detach(), hard.detach()])

    def agreement(self, student, teacher):
        """How many of the batch's answers the student shares with the teacher: the top class, or for multi-label
        each class's decision at 0.5 (a share of the image's classes)."""
        if self.multi:
            return ((student >= 0) == (teacher >= 0)).float().mean(1).sum()
        return (student.argmax(-1) == teacher.argmax(-1)).sum().float()

    def state_dict(self):
        return dict(name=self.name, sha256=self.digest)

    def load_state_dict(self, state):
        if state["sha256"] != self.digest:
            raise UserError(f"--teacher {self.name} is not the teacher the run was trained with ({state['name']}, "
                            f"weights SHA-256 {state['sha256'][:12]}..., this one {self.digest[:12]}...): give "
                            "that one, or start a new run in another --output-dir")
