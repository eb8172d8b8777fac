"""The whole training step as one CUDA graph: the same weights as the same step run eagerly, a non-finite
step skipped inside the graph, short batches and the learning-rate schedule handled, and a graphed run that
resumes to the weights of one never stopped. The learning rates a graph reads are device tensors: checked on
the CPU too."""

import copy

import pytest
import torch

from conftest import resumed_copy, train, weights
from vitfood.common import mixed_precision
from vitfood.config import Config
from vitfood.model import build_model, make_optimizer, make_scheduler
from vitfood.steps import GraphedStep, forward_backward, update

MEAN, STD = [0.5] * 3, [0.5] * 3
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(autouse=True)
def deterministic_attention():
    """SDPA's math kernels, whose backward adds in a fixed order (the fused kernels' may not): equal bits are then
    a fair test of the graph."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):
        yield


def test_update_takes_the_learning_rates_from_the_tensors_given_and_leaves_the_groups_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 8)).sum().backward()
    update(model, optimizer, scaler, 1.0, [torch.zeros((), dtype=torch.float64)])  # lr 0: AdamW moves nothing
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert optimizer.param_groups[0]["lr"] == 1e-2 and not hasattr(optimizer, "found_inf")
    model(torch.randn(5, 8)).sum().backward()
    update(model, optimizer, scaler, 1.0)  # the group's own lr
    assert not any(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _setup(precision, device):
    torch.manual_seed(0)
    cfg = Config(model="vit-micro", lr=1e-2, weight_decay=0.05, attn="sdpa")
    model, _ = build_model(cfg, ["a", "b", "c"], device)
    model.train()
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, 2, 10)
    amp, scaler = mixed_precision(precision, device)
    return model, optimizer, scheduler, amp, scaler


def _batches(sizes, device):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g).pin_memory(),
             torch.randint(0, 3, (n,), generator=g).pin_memory()) for n in sizes]


@cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_a_graphed_step_gives_the_weights_of_the_same_step_run_eagerly(precision):
    device = torch.device("cuda")
    batches = _batches([4] * 7 + [3, 4, 4], device)  # a short batch after the capture: run eagerly
    results = []
    for graphed in (True, False):
        model, optimizer, scheduler, amp, scaler = _setup(precision, device)
        step = GraphedStep(model, optimizer, scaler, scheduler, precision, MEAN, STD, 1.0, 0.0, None, *batches[0], 4)
        norms = []
        for images, labels in batches:
            if graphed:
                _, norm, finite = step(images, labels, labels.numel())
            else:  # the same arithmetic by hand, on the default stream, never captured
                for lr, group in zip(step.lrs, optimizer.param_groups):
                    lr.fill_(group["lr"])
                forward_backward(model, images, labels, step.amp, scaler, MEAN, STD, labels.numel())
                norm, finite = update(model, optimizer, scaler, 1.0, step.lrs)
                scheduler.step()
            norms.append(norm.item())
        if graphed:
            assert step.graph is not None and not step.failed
        results.append(([p.detach().clone() for p in model.parameters()], norms, scheduler.get_last_lr()))
    (graph_weights, graph_norms, graph_lrs), (eager_weights, eager_norms, eager_lrs) = results
    assert graph_lrs == eager_lrs
    assert graph_norms == eager_norms
    worst = max((a - b).abs().max().item() for a, b in zip(graph_weights, eager_weights))
    assert worst == 0, f"graph and eager weights differ by up to {worst}"


@cuda
def test_a_non_finite_step_inside_the_graph_is_skipped_and_lowers_the_fp16_scale():
    device = torch.device("cuda")
    model, optimizer, scheduler, amp, scaler = _setup("fp16", device)
    batches = _batches([4] * 6, device)
    step = GraphedStep(model, optimizer, scaler, scheduler, "fp16", MEAN, STD, 1.0, 0.0, None, *batches[0], 4)
    for images, labels in batches[:4]:
        step(images, labels, 4)
    assert step.graph is not None
    weights = [p.detach().clone() for p in model.parameters()]
    moments = copy.deepcopy([s["exp_avg"] for s in optimizer.state.values()])
    scaler._scale.fill_(2.0 ** 60)  # the scaled loss overflows fp16's range: gradients come out inf
    loss, norm, finite = step(*batches[4], 4)
    assert not finite.item() and scaler.get_scale() == 2.0 ** 59
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, optimizer.state.values()))
    scaler._scale.fill_(2.0 ** 10)  # a scale the loss fits under again: the next replay steps
    loss, norm, finite = step(*batches[5], 4)
    assert finite.item() and not all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


@cuda
def test_a_graphed_run_resumes_to_the_weights_of_one_never_stopped(tmp_path, capsys):
    args = ["--device", "cuda", "--max-steps", 20, "--eval-steps", 10, "--save-steps", 10]
    train(*args, "--output-dir", tmp_path / "whole")
    assert "step: one CUDA graph of the whole step" in capsys.readouterr().out
    # from checkpoint-10: steps 11-20 as 3 eager steps, then the graph, where the whole run replayed throughout
    part = resumed_copy(tmp_path / "whole", tmp_path / "part", *args, later=("checkpoint-20",))
    a, b = weights(tmp_path / "whole"), weights(part)
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst == 0, f"the resumed run's weights differ by up to {worst}"
