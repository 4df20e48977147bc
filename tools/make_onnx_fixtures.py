"""Export the small CNN that tests/test_onnx_import.py converts, with ONNX Runtime's outputs.

Run::

    python tools/make_onnx_fixtures.py [--out tests/data]

Writes ``onnx_small_cnn.onnx`` (torch.onnx.export, the TorchScript-based exporter, opset 17)
and ``onnx_small_cnn.npz`` with ``inputs`` float32 (N, 1, 24, 24) and ``outputs`` float32
(N, 7) computed by ``onnxruntime`` (CPU) on the exported file, plus ``meta`` (versions).

The network uses functional ReLUs (``F.relu``: the converted graph must turn them back into
modules), an explicit asymmetric zero padding (a Pad node), a strided 'same'-like convolution,
BatchNormalization in a branch the exporter cannot fold into a convolution, max-pooling with
ceil_mode, average pooling, Concat, Add, global average pooling, Flatten, Gemm, a bias-free
MatMul and a final Softmax.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """A 24x24 gray input, 7-class CNN touching the converter's operator set."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.conv1 = nn.Conv2d(1, 6, 3, stride=2)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(12, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.avg = nn.AvgPool2d(2)
        self.fc = nn.Linear(8, 16)
        self.out = nn.Parameter(torch.randn(16, 7) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(self.pad(x)))                  # 25 -> 12
        y = F.relu(self.bn(x + self.conv2(x) + 0.25))        # residual, a constant Add, BN after it
        x = torch.cat([x, y], dim=1)
        x = F.relu(self.conv3(x))
        x = self.avg(self.pool(x))                           # 12 -> 6 -> 3
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        x = F.relu(self.fc(x))
        return torch.softmax(x @ self.out, dim=1)


def randomise_batchnorm(module: nn.Module, generator: torch.Generator) -> None:
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            n = bn.num_features
            bn.weight.data = torch.rand(n, generator=generator) + 0.5
            bn.bias.data = torch.randn(n, generator=generator) * 0.3
            bn.running_mean = torch.randn(n, generator=generator) * 0.3
            bn.running_var = torch.rand(n, generator=generator) * 1.5 + 0.5


def export(module: nn.Module, example: torch.Tensor) -> bytes:
    """The module as ONNX bytes (TorchScript exporter, opset 17, batch axis dynamic)."""
    buffer = io.BytesIO()
    torch.onnx.export(module.eval(), example, buffer, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["output"],
                      dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "data"))
    args = parser.parse_args()
    import onnx
    import onnxruntime

    out = Path(args.out)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    network = SmallCNN()
    randomise_batchnorm(network, generator)
    inputs = torch.rand(4, 1, 24, 24, generator=generator) * 2 - 1
    data = export(network, inputs[:1])
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": inputs.numpy()})[0]
    (out / "onnx_small_cnn.onnx").write_bytes(data)
    meta = json.dumps({"torch": torch.__version__, "onnx": onnx.__version__,
                       "onnxruntime": onnxruntime.__version__})
    np.savez_compressed(out / "onnx_small_cnn.npz", inputs=inputs.numpy(), outputs=outputs, meta=meta)
    ops = sorted({node.op_type for node in onnx.load_from_string(data).graph.node})
    print(f"{len(data)} bytes, operators: {', '.join(ops)}")


if __name__ == "__main__":
    main()
