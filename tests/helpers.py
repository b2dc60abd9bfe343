"""What many tests share: sentences from the tiny vocabulary, running an ONNX model, quantizing a variant, an
installed distribution made on the spot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tiny_models import WORDS


def make_distribution(site: Path, name: str, files: list[str]) -> Path:
    """A distribution `name` 0.1.0 (its dist-info in `site`, whose RECORD lists `files`) that importlib.metadata
    finds once `site` is on sys.path (monkeypatch.syspath_prepend); the files themselves are the caller's."""
    info = Path(site) / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    return Path(site)


def sentences(n: int, seed: int, end: str = "") -> list[str]:
    """`n` seeded random sentences of 3-11 words of the tiny models' vocabulary (each ending with `end`)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))) + end for _ in range(n)]


def ort_embed(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The model's `embedding` output for each row of `feeds`, on the ONNX Runtime CPU EP."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rows = range(len(feeds["input_ids"]))
    return np.concatenate([session.run(["embedding"], {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in rows])


def quantize_variant(tmp_path: Path, model: Path, calib: Path | None, name: str, settings, **extra):
    """The quantize stage on `model` with one variant `name`; (its output folder, its payload)."""
    from conftest import SENTENCE_ENCODER

    from tasks.stages.quantize import QuantizeParams, run

    out = tmp_path / name
    payload = run(model=model, calibration=calib, variant=name, params=QuantizeParams(variants={name: settings}, **extra),
                  family=SENTENCE_ENCODER, out_dir=out, key="k-" + name)
    return out, payload


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest cosine between the same rows of two [N, D] arrays."""
    return float(np.min(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def matches_reference(candidate: np.ndarray, reference: np.ndarray, min_cos: float) -> bool:
    """Each candidate row is within `min_cos` of its own reference row and nearer to it than to any other row.
    The second half is what makes the check fail-able on tiny random models, whose embeddings of any two
    sentences sit at cosine ~0.9999: a row fed the wrong sentence, or rows collapsed to one, pass a bare threshold."""
    c = candidate / np.linalg.norm(candidate, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    similarity = c @ r.T
    own = np.diag(similarity)
    others = np.where(np.eye(len(c), dtype=bool), -np.inf, similarity).max(axis=1)
    return bool(len(c) > 1 and own.min() >= min_cos and (own > others).all())


def qdq_bits(graph, tensor: str, side: str = "in") -> int:
    """Activation bits of a QDQ graph at `tensor`: the zero point type of the DequantizeLinear producing it (side
    "in", what its readers get) or of the QuantizeLinear reading it (side "out", what its producer writes)."""
    import onnx

    inits = {i.name: i for i in graph.initializer}
    if side == "in":
        (qdq,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] == tensor]
    else:
        (qdq,) = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    return {onnx.TensorProto.UINT8: 8, onnx.TensorProto.UINT16: 16}[inits[qdq.input[2]].data_type]


def run_outputs(model: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The model's first output for each row of `arrays`, fed as the model declares (build_feeds)."""
    import onnxruntime as ort

    from tasks.core.feeds import build_feeds

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rows = range(len(arrays["input_ids"]))
    return np.concatenate([sess.run(None, build_feeds(sess, {k: v[i : i + 1] for k, v in arrays.items()}))[0]
                           for i in rows])


def make_aimet_export(model: Path, calibration: Path, folder: Path, activation_bits: int = 16) -> dict[str, Path]:
    """What a user brings from AIMET: `model` prepared for the HTP, calibrated in aimet-onnx's QuantSim (HTP v75
    config) and exported with `QuantizationSimModel.export` (`export.onnx` + `export.encodings`), plus the
    sim's own QDQ model (`sim_qdq.onnx`) to compare an import with. Runs in a spawned process: AIMET registers
    its ops in ONNX Runtime's process-wide registry."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_aimet_export, model, calibration, folder, activation_bits).result()


def _aimet_export(model: Path, calibration: Path, folder: Path, activation_bits: int) -> dict[str, Path]:
    import onnx
    from aimet_onnx.quantsim import QuantizationSimModel

    from tasks.recipes.aimet_qnn import prepare_for_htp
    from tasks.transforms.quant_rewrites import int32_biases

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tmp").mkdir(exist_ok=True)
    sim = QuantizationSimModel(prepare_for_htp(model, folder / "tmp"), param_type="int8",
                               activation_type=f"int{activation_bits}", config_file="htp_v75", path=str(folder / "tmp"))
    with np.load(calibration) as npz:
        rows = [{name: npz[name][i : i + 1] for name in npz.files} for i in range(len(npz["input_ids"]))]
    sim.compute_encodings(rows)
    sim.export(str(folder), "export", encoding_version="1.0.0")
    qdq = sim.to_onnx_qdq(prequantize_constants=True)
    int32_biases(qdq.graph)
    onnx.save(qdq, str(folder / "sim_qdq.onnx"))
    return {"onnx": folder / "export.onnx", "encodings": folder / "export.encodings", "sim_qdq": folder / "sim_qdq.onnx"}
