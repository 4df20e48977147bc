"""ONNX import: an exported small CNN (tools/make_onnx_fixtures.py) and the zoo's PyEmotion
network, checked against ONNX Runtime; module ReLUs; listed unsupported operators."""

from __future__ import annotations

import importlib.util
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import captum_parity
from torch import nn

from interp_fer.models import ModelLoadError, load_model
from interp_fer.onnx_import import OnnxImportError, onnx_to_torch

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'interp_fer[onnx]')")

DATA = Path(__file__).resolve().parent / "data"
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None


def _export(module: nn.Module, example: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(module.eval(), example, buffer, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    return buffer.getvalue()


def _runtime(data: bytes | str, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})[0]


def _assert_captum_parity(network: nn.Module, x: torch.Tensor, layer: str, channels: list[int]) -> None:
    from interp_fer.projections import deconvnet

    assert captum_parity(network, x, deconvnet(network, x, layer, channels))


def test_small_cnn_matches_stored_runtime_outputs():
    reference = np.load(DATA / "onnx_small_cnn.npz")
    network = onnx_to_torch(DATA / "onnx_small_cnn.onnx")
    with torch.no_grad():
        outputs = network(torch.from_numpy(reference["inputs"])).numpy()
    # Measured 3e-8 (float32 rounding).
    np.testing.assert_allclose(outputs, reference["outputs"], atol=1e-6, rtol=0)
    assert network.input_chw == (1, 24, 24)


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime not installed")
def test_small_cnn_matches_runtime_live():
    reference = np.load(DATA / "onnx_small_cnn.npz")
    live = _runtime(str(DATA / "onnx_small_cnn.onnx"), reference["inputs"])
    with torch.no_grad():
        ours = onnx_to_torch(DATA / "onnx_small_cnn.onnx")(torch.from_numpy(reference["inputs"])).numpy()
    np.testing.assert_allclose(ours, live, atol=1e-6, rtol=0)


def test_functional_relus_become_modules_and_project_like_captum():
    import onnx

    graph = onnx.load(str(DATA / "onnx_small_cnn.onnx")).graph
    n_relu = sum(node.op_type == "Relu" for node in graph.node)
    network = onnx_to_torch(DATA / "onnx_small_cnn.onnx")
    relus = [name for name, module in network.named_modules() if isinstance(module, nn.ReLU)]
    assert len(relus) == n_relu == 4        # the source network used F.relu throughout
    names = dict(network.named_modules())
    assert isinstance(names["conv1"], nn.Conv2d) and isinstance(names["pad"], nn.ZeroPad2d)
    x = torch.from_numpy(np.load(DATA / "onnx_small_cnn.npz")["inputs"][:2])
    _assert_captum_parity(network, x, relus[2], [0, 4, 7])   # after conv3: pad, concat, add, BN


def test_pyemotion_exported_and_imported(pyemotion, tmp_path):
    from interp_fer.samples import sample_face

    faces = [sample_face(name) for name in ("happy", "surprise", "astronaut")]
    x = pyemotion.preprocess(faces)
    path = tmp_path / "pyemotion.onnx"
    path.write_bytes(_export(pyemotion.module, x[:1]))
    network = onnx_to_torch(path)
    with torch.no_grad():
        ours, zoo = network(x), pyemotion.module(x)
    torch.testing.assert_close(ours, zoo, rtol=0, atol=1e-4)
    if HAS_ORT:
        np.testing.assert_allclose(ours.numpy(), _runtime(str(path), x.numpy()), atol=1e-4, rtol=0)
    # Through load_model, with the zoo's preprocessing given as options.
    model = load_model(path, mean=0.5, std=0.5)
    assert model.input_size == (48, 48) and model.grayscale
    assert model.predict(faces) == pyemotion.predict(faces)
    assert len(model.stages) >= 4
    _assert_captum_parity(model.module, x[:2], model.stages[1], [0, 31, 63])


def test_final_softmax_is_dropped_by_load_model():
    reference = np.load(DATA / "onnx_small_cnn.npz")
    model = load_model(DATA / "onnx_small_cnn.onnx")
    with torch.no_grad():
        logits = model.module(torch.from_numpy(reference["inputs"]))
    assert not any(isinstance(m, nn.Softmax) for m in model.module.modules())
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), reference["outputs"], atol=1e-6)


def test_unsupported_operators_are_listed_together(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [2, 1, 3, 3], np.ones(18, np.float32))
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("LRN", ["c"], ["n"], name="lrn", size=3),
        helper.make_node("Relu", ["n"], ["r"], name="relu"),
        helper.make_node("Erf", ["r"], ["y"], name="erf"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])], [weight])
    path = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(OnnxImportError) as caught:
        onnx_to_torch(path)
    assert "2 unsupported" in str(caught.value)
    assert "lrn (LRN)" in str(caught.value) and "erf (Erf)" in str(caught.value)
    with pytest.raises(ModelLoadError, match="odd.onnx"):
        load_model(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf at all")
    with pytest.raises(OnnxImportError, match="garbage.onnx"):
        onnx_to_torch(garbage)


def test_view_by_batch_size_exports_fold_to_a_flatten(tmp_path):
    # `x.view(x.size(0), -1)` with a dynamic batch axis exports as Shape -> Gather ->
    # Unsqueeze -> Concat -> Reshape; the converter folds that chain into a Flatten.
    import onnx

    class ViewNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, stride=2)
            self.fc = nn.Linear(4 * 7 * 7, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.conv(x))
            return self.fc(x.view(x.size(0), -1))

    torch.manual_seed(0)
    network = ViewNet().eval()
    path = tmp_path / "view.onnx"
    path.write_bytes(_export(network, torch.zeros(1, 1, 16, 16)))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "Shape" in ops and "Reshape" in ops
    converted = onnx_to_torch(path)
    assert any(isinstance(m, nn.Flatten) for m in converted.modules())
    x = torch.rand(5, 1, 16, 16)                  # another batch size than the example's
    with torch.no_grad():
        torch.testing.assert_close(converted(x), network(x), rtol=0, atol=1e-5)
    if HAS_ORT:
        np.testing.assert_allclose(converted(x).detach().numpy(), _runtime(str(path), x.numpy()),
                                   atol=1e-5, rtol=0)
