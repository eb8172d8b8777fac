"""The training step reads nothing back from the device, and skipping a non-finite step on the device gives
the very weights that skipping it on the host gave."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vitfood.common import mixed_precision
from vitfood.config import Config
from vitfood.model import build_model, make_optimizer, make_scheduler
from vitfood.steps import NonFiniteStreak, forward_backward, optimizer_step

MEAN, STD = [0.5] * 3, [0.5] * 3
CPU = torch.device("cpu")


def _setup(precision, device=CPU):
    torch.manual_seed(0)
    cfg = Config(model="vit-micro", lr=1e-2, weight_decay=0.05)
    model, _ = build_model(cfg, ["a", "b", "c"], device)
    model.to(device).train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, 2, 10)
    amp, scaler = mixed_precision(precision, device)
    if precision == "fp16":
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 10)
    return model, optimizer, scheduler, amp, scaler


def _batches(n, device=CPU):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=g).to(device),
             torch.randint(0, 3, (4,), generator=g).to(device)) for _ in range(n)]


def _synchronous_step(model, optimizer, scaler, scheduler, max_grad_norm):
    """The step as it was: the finite check read on the host, the optimizer step skipped in Python."""
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if bool(torch.isfinite(norm)):
        scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_skipping_on_the_device_gives_the_same_weights_bit_for_bit(precision):
    results = []
    for step_fn in (optimizer_step, _synchronous_step):
        model, optimizer, scheduler, amp, scaler = _setup(precision)
        for i, (images, labels) in enumerate(_batches(8)):
            forward_backward(model, images, labels, amp, scaler, MEAN, STD, labels.numel())
            if i in (2, 3, 6):  # an overflow, two in a row, and another later
                next(model.parameters()).grad.view(-1)[0] = float("inf") if i != 3 else float("nan")
            step_fn(model, optimizer, scaler, scheduler, 1.0)
        state = [t.clone() for s in optimizer.state.values() for t in s.values()]
        results.append(([p.detach().clone() for p in model.parameters()], state, scaler.get_scale()))
    (w1, s1, scale1), (w2, s2, scale2) = results
    assert all(torch.equal(a, b) for a, b in zip(w1, w2)) and all(torch.equal(a, b) for a, b in zip(s1, s2))
    assert scale1 == scale2 and (precision != "fp16" or scale1 == 2.0 ** 10 / 8)  # three overflows halved it thrice
    step_counts = {s["step"].item() for s in optimizer.state.values()}
    assert step_counts == {8 - 3}  # skipped steps are not counted by AdamW


class NoHostReads(TorchFunctionMode):
    """Fails on every way of reading a tensor's value on the host: each is a host-device sync on a GPU."""
    READS = {"__bool__", "item", "tolist", "__float__", "__int__", "__index__", "numpy", "cpu"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            raise AssertionError(f"the step read a tensor on the host: Tensor.{name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_step_reads_nothing_back_from_the_device(precision):
    model, optimizer, scheduler, amp, scaler = _setup(precision)
    streak = NonFiniteStreak(3, CPU)
    batches = _batches(4)
    for step, (images, labels) in enumerate(batches[:2], 1):  # first steps: lazy state is made
        forward_backward(model, images, labels, amp, scaler, MEAN, STD, labels.numel())
        streak.update(optimizer_step(model, optimizer, scaler, scheduler, 1.0)[1], step)
    with NoHostReads():
        for step, (images, labels) in enumerate(batches[2:], 3):
            forward_backward(model, images, labels, amp, scaler, MEAN, STD, labels.numel())
            if step == 4:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            norm, finite = optimizer_step(model, optimizer, scaler, scheduler, 1.0)
            streak.update(finite, step)
    assert streak.check(lambda: None) == 1  # read here, outside the step: one skipped step


def test_the_streak_stops_the_run_at_the_limit():
    streak = NonFiniteStreak(3, CPU)
    for step, finite in enumerate([True, False, False, True, False, False], 1):
        streak.update(torch.tensor(finite), step)
    assert streak.check(lambda: None) == 4  # two streaks of 2: below the limit
    streak.update(torch.tensor(False), 7)  # the third in a row
    with pytest.raises(Exception, match=r"not finite for 3 consecutive steps \(5 to 7\)"):
        streak.check(lambda: "checkpoint-4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the sync debug mode watches the GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_steady_steps_make_no_host_device_sync_on_cuda(precision):
    device = torch.device("cuda")
    model, optimizer, scheduler, amp, scaler = _setup(precision, device)
    streak = NonFiniteStreak(3, device)
    batches = _batches(6, device)

    def step(i, images, labels):
        forward_backward(model, images, labels, amp, scaler, MEAN, STD, labels.numel())
        streak.update(optimizer_step(model, optimizer, scaler, scheduler, 1.0)[1], i)

    for i, (images, labels) in enumerate(batches[:2], 1):  # warm-up: lazy state, kernels
        step(i, images, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    try:
        for i, (images, labels) in enumerate(batches[2:], 3):
            step(i, images, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert streak.check(lambda: None) == 0


def test_an_older_checkpoints_foreach_optimizer_state_resumes_into_the_fused_step(tmp_path):
    """vitfood before the sync-free step built AdamW with foreach on the CPU; its state, loaded, must not
    bring that back (the fused kernel is what skips a non-finite step)."""
    from vitfood import checkpoint
    from vitfood.state import rng_state
    model, optimizer, scheduler, amp, scaler = _setup("fp32")
    params = list(model.parameters())  # grouped as make_optimizer groups them
    old = torch.optim.AdamW([dict(params=[p for p in params if p.ndim >= 2], weight_decay=0.05),
                             dict(params=[p for p in params if p.ndim < 2], weight_decay=0.0)], lr=1e-2, foreach=True)
    for images, labels in _batches(2):
        forward_backward(model, images, labels, amp, scaler, MEAN, STD, labels.numel())
        old.step()
        old.zero_grad()
    model.save_pretrained(tmp_path)
    state = checkpoint.upgrade(dict(  # the flat layout of training_state.pt before FORMAT 2
        step=2, metrics=None, optimizer=old.state_dict(), scheduler=scheduler.state_dict(), scaler={},
        data_position=dict(epoch=0, batch=2), rng=rng_state()))
    checkpoint.restore(tmp_path, state, model, dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler))
    images, labels = _batches(3)[2]
    forward_backward(model, images, labels, amp, scaler, MEAN, STD, labels.numel())
    norm, finite = optimizer_step(model, optimizer, scaler, scheduler, 1.0)
    assert bool(finite) and {s["step"].item() for s in optimizer.state.values()} == {3}


def test_fp16_scaler_skips_a_step_with_inf_gradient():
    """On a plain model, as a user's own would be: the GradScaler's path on the CPU (fp16 autocast)."""
    from vitfood.common import autocast
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    model.forward_orig = model.forward
    model.forward = lambda pixel_values: type("Out", (), {"logits": model.forward_orig(pixel_values)})
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)  # as make_optimizer builds it
    sched = make_scheduler(opt, 0, 10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    amp = autocast("fp16", torch.device("cpu"))
    images, labels = torch.randint(0, 255, (4, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 2, 0])
    before = [p.detach().clone() for p in model.parameters()]
    forward_backward(model, images, labels, amp, scaler, [0.5] * 3, [0.5] * 3, labels.numel())
    next(model.parameters()).grad[0, 0] = float("inf")
    norm, stepped = optimizer_step(model, opt, scaler, sched, 1.0)
    assert not stepped and not math.isfinite(norm.item()) and scaler.get_scale() == 512.0
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # skipped
    forward_backward(model, images, labels, amp, scaler, [0.5] * 3, [0.5] * 3, labels.numel())
    optimizer_step(model, opt, scaler, sched, 1.0)
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))  # a finite step applies


def test_balanced_accuracy_and_macro_f1_from_the_confusion_matrix():
    from vitfood.metrics import class_balanced
    # class 0: 8 of 10 right; class 1: 1 of 2; class 2: not in the split and never predicted
    m = class_balanced([[8, 2, 0], [1, 1, 0], [0, 0, 0]])
    assert m["balanced_acc"] == pytest.approx((0.8 + 0.5) / 2)  # top-1 would say 9/12 = 0.75
    assert m["f1_macro"] == pytest.approx((16 / 19 + 2 / 5) / 2)
