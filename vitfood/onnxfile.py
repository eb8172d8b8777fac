"""A classifier out of PyTorch: written to ONNX (torch.onnx's dynamo exporter), quantized to int8 (onnxruntime's
dynamic quantization), and an exported file run by onnxruntime as a transformers classifier is called
(`model(pixel_values=...).logits`), so that vitfood's eval, predict and evaluate take either alike.

Needs the `export` extra: `pip install 'vitfood[export]'` (onnx, onnxruntime, onnxscript).
"""

import contextlib
import io
import os
from types import SimpleNamespace

import torch

from vitfood.common import UserError, first_line
from vitfood.seal import check_intact

OPSET = 18  # the dynamo exporter's own default: every op vitfood's families use has it


def need(what="exporting to ONNX"):
    """Import onnx and onnxruntime, or say in one line how to install them."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise UserError(f"{what} needs the export extra ({e.name} is missing): pip install 'vitfood[export]'") from None


class _Logits(torch.nn.Module):
    """The classifier as ONNX sees it: float32 pixel values in, logits out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def to_onnx(model, path, size, opset=OPSET):
    """Write `model` (in eval mode, fp32, on the CPU) to `path`: input `pixel_values` (batch, 3, *size) with a
    dynamic batch axis, output `logits`. One line naming the family and the reason when it does not export."""
    need()
    import onnx
    example = torch.zeros((2, 3, *size))
    batch = torch.export.Dim("batch", min=1, max=4096)
    chatter = io.StringIO()  # the exporter's progress lines: on error, its message says what matters
    try:
        with contextlib.redirect_stdout(chatter), torch.no_grad():
            torch.onnx.export(_Logits(model).eval(), (example,), path, input_names=["pixel_values"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                              external_data=False)
        onnx.checker.check_model(path)
    except Exception as e:
        raise UserError(f"{type(model).__name__} does not export to ONNX (opset {opset}): {first_line(e, 200)}") from None


def to_int8(source, path):
    """An int8 copy of the ONNX file `source` at `path`: onnxruntime's dynamic quantization (int8 weights of the
    matrix products and convolutions; activations quantized per batch as it runs), which needs no calibration data."""
    need()
    import logging
    from onnxruntime.quantization import QuantType, quantize_dynamic
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph first: on the demo model, neither more accurate nor faster
    try:
        quantize_dynamic(source, path, weight_type=QuantType.QInt8)
    except Exception as e:
        raise UserError(f"the int8 quantization of {os.path.basename(source)} failed: {first_line(e, 200)}") from None
    finally:
        root.setLevel(level)


class OnnxClassifier:
    """An exported model.onnx run by onnxruntime on the CPU, called as a transformers image classifier is, with
    the config (labels, problem type) that sits beside it. For eval, predict and evaluate: fp32 inputs, CPU."""

    training = False

    def __init__(self, path, threads=None):
        import onnxruntime as ort
        from transformers import AutoConfig
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.config = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)))
        self.input = self.session.get_inputs()[0].name

    def __call__(self, pixel_values):
        logits = self.session.run(None, {self.input: pixel_values.detach().cpu().float().numpy()})[0]
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def eval(self):
        return self

    def train(self, mode=True):
        return self


def load(path, threads=None):
    """(OnnxClassifier, image processor) of an ONNX file in an export folder; one line when it cannot be read."""
    need("running an ONNX model")
    from transformers import AutoImageProcessor
    if not os.path.isfile(os.path.expanduser(path)):
        raise UserError(f"model file {path} does not exist")
    path = os.path.abspath(os.path.expanduser(path))
    check_intact(os.path.dirname(path))
    try:
        return OnnxClassifier(path, threads), AutoImageProcessor.from_pretrained(os.path.dirname(path))
    except Exception as e:
        raise UserError(f"cannot load {path}: {first_line(e, 200)} (an export folder holds the .onnx file, config.json "
                        "and preprocessor_config.json)") from None


def is_onnx(name):
    return str(name).lower().endswith(".onnx")


def cpu_name():
    """The CPU's model name, as /proc/cpuinfo gives it (where there is one)."""
    import platform
    try:
        with open("/proc/cpuinfo") as fh:
            return next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
