"""insightface backend through insightface's real ``model_zoo`` loading code, with tiny ONNX models built here.

The tiny detector has SCRFD's interface (9 outputs: scores/boxes/keypoints at strides 8/16/32, two anchors) and
"detects" bright 32x32 cells at stride 32; its keypoints are ArcFace's template inside a 3x3-cell box. The tiny
recogniser has ArcFace's interface (``(N, 3, 112, 112)`` -> ``(N, 512)``): average-pool to 8x8 and a fixed random
projection. Together they exercise loading, routing, SCRFD decoding + NMS, ArcFace alignment and batching.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from pipeline_data.faces import BackendUnavailableError, NoFaceError, get_encoder  # noqa: E402
from pipeline_data.faces.insightface_backend import ARCFACE_TEMPLATE, InsightFaceEncoder  # noqa: E402

STRIDE = 32
OPSET = [helper.make_opsetid("", 17)]


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return helper.make_node(
        "Constant",
        [],
        [name],
        value=helper.make_tensor(name + "_t", TensorProto.FLOAT, arr.shape, arr.ravel().tolist()),
    )


def build_tiny_scrfd(path: Path) -> Path:
    """An SCRFD-shaped detector: a bright stride-32 cell -> a 3x3-cell face box with ArcFace-template keypoints."""
    nodes = [helper.make_node("ReduceMean", ["input.1"], ["gray"], axes=[1], keepdims=1, name="gray")]
    # box distances (left, top, right, bottom) from the anchor (the cell's top-left corner), in strides
    box = np.array([[1.0, 1.0, 2.0, 2.0]], np.float32)
    kps = (0.5 + (ARCFACE_TEMPLATE / 112.0 - 0.5) * 3.0).reshape(1, 10).astype(np.float32)
    nodes += [
        _const("box_c", box),
        _const("kps_c", kps),
        _const("zero", np.zeros((1,), np.float32)),
        _const("thr", np.array([0.8], np.float32)),
        _const("gain", np.array([40.0], np.float32)),
    ]
    nodes.append(
        helper.make_node(
            "Constant", [], ["shape_n1"], value=helper.make_tensor("shape_n1_t", TensorProto.INT64, [2], [-1, 1])
        )
    )
    scores, boxes, points = [], [], []
    for s in (8, 16, 32):
        nodes.append(helper.make_node("AveragePool", ["gray"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s]))
        if s == STRIDE:
            nodes += [
                helper.make_node("Sub", [f"pool{s}", "thr"], [f"d{s}"]),
                helper.make_node("Mul", [f"d{s}", "gain"], [f"z{s}"]),
                helper.make_node("Sigmoid", [f"z{s}"], [f"sc{s}"]),
            ]
        else:
            nodes.append(helper.make_node("Mul", [f"pool{s}", "zero"], [f"sc{s}"]))
        nodes += [
            helper.make_node("Transpose", [f"sc{s}"], [f"t{s}"], perm=[0, 2, 3, 1]),
            helper.make_node("Concat", [f"t{s}", f"t{s}"], [f"a{s}"], axis=3),  # two anchors per cell
            helper.make_node("Reshape", [f"a{s}", "shape_n1"], [f"score_{s}"]),
            helper.make_node("Mul", [f"score_{s}", "zero"], [f"o{s}"]),
            helper.make_node("Add", [f"o{s}", "box_c"], [f"bbox_{s}"]),
            helper.make_node("Add", [f"o{s}", "kps_c"], [f"kps_{s}"]),
        ]
        scores.append(helper.make_tensor_value_info(f"score_{s}", TensorProto.FLOAT, [f"n{s}", 1]))
        boxes.append(helper.make_tensor_value_info(f"bbox_{s}", TensorProto.FLOAT, [f"n{s}", 4]))
        points.append(helper.make_tensor_value_info(f"kps_{s}", TensorProto.FLOAT, [f"n{s}", 10]))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])
    graph = helper.make_graph(nodes, "tiny_scrfd", [inp], scores + boxes + points)
    model = helper.make_model(graph, opset_imports=OPSET, ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build_tiny_arcface(path: Path, dim: int = 512, seed: int = 0) -> Path:
    """An ArcFace-shaped recogniser: (N, 3, 112, 112) -> average-pool 8x8 -> fixed random projection -> (N, dim)."""
    w = np.random.default_rng(seed).standard_normal((3 * 8 * 8, dim)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["data"], ["pooled"], kernel_shape=[14, 14], strides=[14, 14], name="pool0"),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1, name="flatten0"),
        _const("proj_w", w),
        helper.make_node("MatMul", ["flat", "proj_w"], ["fc1"], name="fc"),
    ]
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", dim])
    model = helper.make_model(
        helper.make_graph(nodes, "tiny_arcface", [inp], [out]), opset_imports=OPSET, ir_version=8
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def pack_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("packs") / "buffalo_l"
    d.mkdir()
    build_tiny_scrfd(d / "det_10g.onnx")
    build_tiny_arcface(d / "w600k_r50.onnx")
    return d


@pytest.fixture(scope="module")
def enc(pack_dir) -> InsightFaceEncoder:
    return InsightFaceEncoder(pack_dir, providers=["CPUExecutionProvider"])


def scene(cell: tuple[int, int], who: str, size: int = 640) -> np.ndarray:
    """Black image with a white 32x32 "face" cell and an identity mark (red bar left / blue bar below)."""
    img = np.zeros((size, size, 3), np.uint8)
    cx, cy = cell
    x0, y0 = cx * STRIDE, cy * STRIDE
    img[y0 : y0 + STRIDE, x0 : x0 + STRIDE] = 255
    if who == "red":
        img[y0 : y0 + STRIDE, x0 - 20 : x0 - 4] = (255, 0, 0)
    elif who == "blue":
        img[y0 + STRIDE + 4 : y0 + STRIDE + 20, x0 : x0 + STRIDE] = (0, 0, 255)
    return img


def test_routes_through_insightface_model_zoo(enc):
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.scrfd import SCRFD

    assert isinstance(enc._det, SCRFD) and enc._det.use_kps and enc._det.fmc == 3
    assert isinstance(enc._rec, ArcFaceONNX) and enc._rec.input_mean == 127.5
    assert (enc.dim, enc.chip_size, enc.name) == (512, 112, "insightface")


def test_detect_box_and_keypoints(enc):
    faces = enc.detect(scene((6, 5), "red"))
    assert len(faces) == 1
    f = faces[0]
    # box = the white cell (192..224, 160..192) grown by one cell on each side
    np.testing.assert_allclose(f.box, (160, 128, 256, 224), atol=1.0)
    assert f.score > 0.9 and f.landmarks.shape == (5, 2)
    assert f.landmarks[0, 0] < f.landmarks[1, 0]  # left eye left of right eye


def test_embedding_invariant_to_position_and_separates_marks(enc):
    a1 = enc.embed(scene((6, 5), "red"))
    a2 = enc.embed(scene((12, 14), "red"))
    b = enc.embed(scene((9, 3), "blue"))
    assert a1.embedding.shape == (512,) and abs(np.linalg.norm(a1.embedding) - 1) < 1e-5
    assert enc.similarity(a1.embedding, a2.embedding) > 0.999  # alignment removes the translation
    assert enc.similarity(a1.embedding, b.embedding) < 0.99


def test_several_faces_largest_with_warning_and_no_face(enc):
    img = scene((4, 4), "red")
    img[384:416, 480:512] = 255  # a second "face"
    res = enc.embed(img)
    assert res.num_faces == 2 and res.warnings and "largest" in res.warnings[0]
    with pytest.raises(NoFaceError):
        enc.embed(np.zeros((640, 640, 3), np.uint8))


def test_batch_matches_single_and_align(enc):
    imgs = [scene((6, 5), "red"), scene((9, 3), "blue"), np.zeros((100, 100, 3), np.uint8)]
    out = enc.embed_many(imgs, errors="return")
    assert isinstance(out[2], NoFaceError)
    np.testing.assert_allclose(out[0].embedding, enc.embed(imgs[0]).embedding, atol=1e-5)
    chip = enc.align(imgs[0], out[0].face, size=64, padding=0.25)
    assert chip.shape == (64, 64, 3) and chip.dtype == np.uint8
    centre = chip[24:40, 24:40].mean()
    assert centre > 200  # the white "face" cell lands in the middle of the aligned crop
    e = enc.embed_image_as_face(enc.align(imgs[0], out[0].face, size=112, padding=0.0))
    assert enc.similarity(e, out[0].embedding) > 0.99


def test_get_encoder_and_antelopev2_nested_layout(tmp_path, pack_dir):
    nested = tmp_path / "antelopev2" / "antelopev2"
    nested.mkdir(parents=True)
    shutil.copy(pack_dir / "det_10g.onnx", nested / "scrfd_10g_bnkps.onnx")
    shutil.copy(pack_dir / "w600k_r50.onnx", nested / "glintr100.onnx")
    enc2 = get_encoder("insightface", model_dir=tmp_path / "antelopev2", cached=False)
    assert enc2.model_dir == nested
    assert len(enc2.detect(scene((3, 3), "blue"))) == 1


def test_missing_pack_names_directory_and_files(tmp_path):
    missing = tmp_path / "nope" / "buffalo_l"
    with pytest.raises(BackendUnavailableError) as ei:
        InsightFaceEncoder(missing)
    assert str(missing) in str(ei.value) and "det_10g.onnx" in str(ei.value) and "w600k_r50.onnx" in str(ei.value)
    assert ei.value.directory == missing and "glintr100.onnx" in ei.value.expected


def test_incomplete_pack_names_the_missing_model(tmp_path, pack_dir):
    d = tmp_path / "buffalo_l"
    d.mkdir()
    shutil.copy(pack_dir / "det_10g.onnx", d / "det_10g.onnx")
    with pytest.raises(BackendUnavailableError, match="no recognition model") as ei:
        InsightFaceEncoder(d)
    assert str(d) in str(ei.value) and "w600k_r50.onnx" in str(ei.value)
    (d / "w600k_r50.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(BackendUnavailableError, match="w600k_r50.onnx"):
        InsightFaceEncoder(d)
