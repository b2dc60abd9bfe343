"""Peer exports for `edgeopt peers`: bad descriptions are one line; token-embedding outputs are pooled as their users
pool them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from flows.peers import read_peers, recommended, summarise
from tasks.core.catalog import Catalog
from tasks.core.errors import InputError
from tasks.runtime.peer_worker import mean_pool_normalise

SPEC = {"name": "p", "tool": {"name": "tool", "version": "1"}, "engine": "onnxruntime", "model_file": "model.onnx",
        "precision": "int8 dynamic", "pooling": {"in_graph": False}}


def _peer(folder, **changes):
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"x")
    (folder / "peer.json").write_text(json.dumps({**SPEC, **changes}))


def test_peer_descriptions_are_read_and_bad_ones_are_one_line(tmp_path):
    _peer(tmp_path / "ok")
    (peer,) = read_peers(tmp_path)
    assert (peer.device, peer.pooling, peer.int8, peer.tool) == ("ort_cpu", "mean", True, "tool 1")
    _peer(tmp_path / "bad", engine="tensorrt")
    with pytest.raises(InputError, match=r"bad/peer.json: engine 'tensorrt' is none of"):
        read_peers(tmp_path)
    with pytest.raises(InputError, match="no \\*/peer.json; build the peer exports first"):
        read_peers(tmp_path / "empty")
    _peer(tmp_path / "more" / "gone", model_file="missing.onnx")
    with pytest.raises(InputError, match="model_file missing.onnx not found"):
        read_peers(tmp_path / "more")


def test_token_embeddings_are_averaged_over_real_tokens_and_normalised():
    tokens = np.array([[[3.0, 4.0], [1.0, 0.0], [100.0, 100.0]]], dtype=np.float32)
    pooled = mean_pool_normalise(tokens, np.array([[1, 1, 0]]))  # the third token is padding
    np.testing.assert_allclose(pooled, [[2 / np.hypot(2, 2), 2 / np.hypot(2, 2)]], rtol=1e-6)  # mean [2, 2]


def test_speed_ups_are_per_round_ratios_against_the_fastest_int8_peer_of_the_same_engine_and_of_any():
    """Two engines: ORT's int8 peer is the fastest of all; OpenVINO's choice beats its own engine's int8 peer 2x in
    every round but not ORT's; the fp32 peer never counts as the int8 bar."""
    means = {("ort_cpu", "mine_ort"): [1.0, 1.1], ("ort_cpu", "ort_int8"): [1.5, 1.65], ("ort_cpu", "ort_fp32"): [0.5, 0.5],
             ("openvino_cpu", "mine_ov"): [2.0, 1.0], ("openvino_cpu", "ov_int8"): [4.0, 2.0]}
    rounds = pd.DataFrame([{"round": r + 1, "device": d, "artifact": a, "latency_mean_ms": m[r], "latency_p50_ms": m[r],
                            "latency_p99_ms": 2 * m[r], "threads": 2, "engine_version": "x", "cpu_model": "cpu",
                            "cpu_flags": "avx2"} for (d, a), m in means.items() for r in range(2)])
    kinds = {a: {"kind": "edgeopt" if a.startswith("mine") else "peer", "tool": "t", "int8": "int8" in a, "precision": ""}
             for _, a in means}
    scores = {a: [{"eval_set": "stsb", "metric_name": "spearman", "metric_value": 80.0}] for _, a in means}
    table = summarise(rounds, scores, kinds).set_index("artifact")
    assert table.loc["mine_ov", "fastest_int8_peer_same_engine"] == "ov_int8"
    assert table.loc["mine_ov", "speedup_vs_same_engine_int8_peer"] == pytest.approx(2.0)
    assert table.loc["mine_ov", "fastest_int8_peer"] == "ort_int8"
    assert table.loc["mine_ov", "speedup_vs_fastest_int8_peer"] == pytest.approx(np.median([1.5 / 2.0, 1.65 / 1.0]))
    assert table.loc["mine_ort", "speedup_vs_same_engine_int8_peer"] == pytest.approx(1.5)
    assert table.loc["mine_ort", "stsb_spearman"] == 80.0


def test_every_compile_target_the_run_chose_for_an_engine_is_an_arm_fastest_first(tmp_path):
    """A run chooses per compile target (OpenVINO at f32 and at bf16): both go up against the peers, so a slower choice
    that scores higher is measured beside them too."""
    outputs = Catalog(tmp_path)
    choices = {"openvino_cpu/host": ("pruned", "ov_int8", "pinned", "8/16", 1.4),
               "openvino_cpu/host_bf16": ("pruned", "fp32_dyn", "dynamic", "<=128", 1.8),
               "ort_cpu/host": ("dense", "fp32", "static", "128", 9.0)}
    summary = {"shape_choice": {}}
    for key, (model, variant, policy, shapes, ms) in choices.items():
        device, target = key.split("/")
        folder = outputs.bundle_dir(model, variant, device) / target
        folder.mkdir(parents=True)
        manifest = {"family": "sentence_encoder", "device": device, "target": target, "dynamic": policy != "static",
                    "buckets": [{"shape": 16 if policy == "pinned" else 128, "artifact": "model.xml"}]}
        if policy == "pinned":
            manifest["pinned"] = [8, 16]
        (folder / "manifest.json").write_text(json.dumps(manifest))
        summary["shape_choice"][key] = {"model": model, "variant": variant, "policy": policy, "shapes": shapes,
                                        "latency_mix_mean_ms": ms}
    arms = recommended(summary, outputs, "openvino_cpu")
    assert [arm["label"] for arm, _ in arms] == ["edgeopt pruned/ov_int8 pinned 8/16",
                                                 "edgeopt pruned/fp32_dyn host_bf16 dynamic <=128"]
    assert [(arm["pinned"], longest) for arm, longest in arms] == [(True, 16), (False, 128)]
    ((static, longest),) = recommended(summary, outputs, "ort_cpu")
    assert static["policy"] == 128 and longest == 128
    with pytest.raises(InputError, match="summary.json has no shape_choice for qnn_htp"):
        recommended(summary, outputs, "qnn_htp")
