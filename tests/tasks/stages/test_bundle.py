"""Bundles on a tiny BERT: the router sends each input to the smallest bucket that holds it, truncates (and
counts) longer ones, and the stage times the user's inputs through the same Bundle a deployment loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SENTENCE_ENCODER, STSB_TEST

from tasks.core.errors import InputError, StageError
from tasks.core.machine import host_cpu
from tasks.core.schemas import BUNDLE_KEY, BUNDLE_ROWS
from tasks.data.evaluation import EvaluationParams, SentencePairsSet
from tasks.data.text import MixSample, TextSource
from tasks.families import FAMILIES
from tasks.runtime.bundle import Bundle, read_manifest, route
from tasks.backends.worker import MixTiming
from tasks.stages.bundle import BundleParams
from tasks.stages.bundle import run as bundle_run
from tasks.stages.race import RaceParams
from tasks.stages.race import arms as race_arms
from tasks.stages.race import run as race_run
from tasks.stages.reference import ReferenceParams
from tasks.stages.reference import run as reference_run

STSB = SentencePairsSet(name="stsb", reader="stsb", path=STSB_TEST, max_items=20)
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)  # > 32 tokens


def test_route_picks_the_smallest_bucket_holding_each_input_and_truncates_beyond_the_largest():
    routes = route(np.array([3, 8, 9, 16, 17, 32, 33, 400]), [32, 8, 16])
    assert routes.shapes.tolist() == [8, 8, 16, 16, 32, 32, 32, 32]
    assert routes.truncated.tolist() == [False] * 6 + [True, True]
    assert routes.counts() == {8: 2, 16: 2, 32: 4}


@pytest.fixture(scope="module")
def reference32(tiny_onnx32, tiny_bert, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference32")
    reference_run(model=tiny_onnx32, model_dir=tiny_bert, evaluation_params=EvaluationParams(sets=[STSB]), seq_len=32, params=ReferenceParams(samples=40),
                  family=SENTENCE_ENCODER, out_dir=out, key="r")
    return out / "outputs.npy"


@pytest.fixture(scope="module")
def bundled(tiny_onnx, tiny_onnx32, tiny_bert, reference32, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    texts = ["a dog", "two men are playing chess in the park", "a woman slices an onion", LONG,
             "the cat sat on the mat while the rain fell"]
    inputs = tmp / "inputs.csv"
    pd.DataFrame({"text": texts}).to_csv(inputs, index=False)
    out = tmp / "out"
    payload = bundle_run(
        sources={16: tiny_onnx, 32: tiny_onnx32}, compiled={}, model_dir=tiny_bert, text=inputs,
        reference_outputs=reference32, model="dense", variant="fp32", device="ort_cpu",
        params=BundleParams(mix_samples=10), text_source=TextSource(path=inputs, format="csv", column="text"),
        timing=MixTiming(threads=1, warmup_runs=2, worker_timeout_s=600),
        evaluation_params=EvaluationParams(sets=[STSB]), family=SENTENCE_ENCODER, out_dir=out, key="k",
    )
    lengths = FAMILIES.get("sentence_encoder").input_lengths(
        FAMILIES.get("sentence_encoder").load_preprocessor(tiny_bert), texts)
    return payload, out, texts, lengths


def test_the_stage_times_every_shape_policy_on_the_users_inputs(bundled):
    payload, out, texts, lengths = bundled
    rows = {(r["policy"], r["shapes"]): r for r in payload["rows"]}
    assert set(rows) == {("buckets", "16/32"), ("static", "16"), ("static", "32")}
    BUNDLE_ROWS.validate(pd.DataFrame(payload["rows"], columns=list(BUNDLE_ROWS.columns)))
    buckets = rows["buckets", "16/32"]
    assert lengths.max() > 32 and (lengths <= 16).any() and ((lengths > 16) & (lengths <= 32)).any()
    assert json.loads(buckets["bucket_counts"]) == {"16": int((lengths <= 16).sum()), "32": int((lengths > 16).sum())}
    assert buckets["truncated_inputs"] == int((lengths > 32).sum()) == 1
    assert rows["static", "16"]["truncated_inputs"] == int((lengths > 16).sum())
    assert buckets["mix_inputs"] == len(texts) and buckets["contexts"] == 2
    for row in rows.values():
        assert 0 < row["latency_mix_p50_ms"] <= row["latency_mix_p99_ms"] and row["cpu_model"]
    assert buckets["size_mb"] == pytest.approx(rows["static", "16"]["size_mb"] + rows["static", "32"]["size_mb"])
    # Routed as deployed: the fp32 buckets score what the 32-token artifact scores (padding is masked out).
    assert buckets["accuracy_source"] == "artifact" and buckets["eval_items"] == 20
    assert [e["eval_set"] for e in payload["evaluations"]] == ["stsb"]
    assert (out / "host" / "manifest.json").is_file() and (out / "outputs-host.npy").is_file()


DEPLOYMENT = """
import json, logging, sys
import numpy as np
from tasks.runtime.bundle import Bundle
logging.basicConfig(level=logging.WARNING, format="%(message)s")
texts = json.loads(sys.argv[2])
bundle = Bundle.load(sys.argv[1], threads=1)
outputs = bundle.run(texts)
direct = bundle.models[16].run(bundle.feeds(texts[:1], 16))
print(json.dumps({"shapes": bundle.routes(texts).shapes.tolist(), "rows": len(outputs),
                  "same_as_direct": bool(np.array_equal(outputs[0], direct[0])),
                  "own_pools": [m.session.get_session_options().use_per_session_threads for m in bundle.models.values()]}))
"""


def test_the_bundle_a_deployment_loads_routes_like_the_stage_and_warns_on_truncation(bundled):
    """In a process of its own, as a deployment runs it (the ORT sessions then share one thread pool, which
    ORT makes process-wide)."""
    _, out, texts, lengths = bundled
    manifest = read_manifest(out / "host")
    assert manifest.shapes == [16, 32] and manifest.device == "ort_cpu"
    proc = subprocess.run([sys.executable, "-c", DEPLOYMENT, str(out / "host"), json.dumps(texts)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["shapes"] == [16 if n <= 16 else 32 for n in lengths] and result["rows"] == len(texts)
    assert "1 of 5 inputs are longer than the largest bucket (32) and were truncated" in proc.stderr
    # The short input ran on the 16-token artifact: the same numbers as that artifact fed directly.
    assert result["same_as_direct"]
    assert result["own_pools"] == [False, False]  # one pool for both buckets' sessions


def test_a_folder_without_a_manifest_is_one_clear_line(tmp_path):
    with pytest.raises(InputError, match="manifest.json: not found"):
        Bundle.load(tmp_path, threads=1)


def test_one_length_is_timed_on_the_inputs_without_a_routing_pass(tiny_onnx, tiny_bert, reference32, tmp_path):
    """Nothing to route: the static row alone (its accuracy is the benchmark's), and no evaluation pass."""
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("a dog\nthe cat sat on the mat while the rain fell\n" + LONG + "\n")
    payload = bundle_run(
        sources={16: tiny_onnx}, compiled={}, model_dir=tiny_bert, text=inputs, reference_outputs=reference32,
        model="dense", variant="fp32", device="ort_cpu", params=BundleParams(mix_samples=10),
        text_source=TextSource(path=inputs, format="txt"), timing=MixTiming(threads=1, warmup_runs=2, worker_timeout_s=600),
        evaluation_params=EvaluationParams(sets=[STSB]), family=SENTENCE_ENCODER, out_dir=tmp_path / "out", key="k",
    )
    (row,) = payload["rows"]
    assert (row["policy"], row["shapes"], row["truncated_inputs"], row["mix_inputs"]) == ("static", "16", 2, 3)
    assert row["latency_mix_mean_ms"] > 0 and payload["evaluations"] == []
    assert not (tmp_path / "out" / "outputs-host.npy").exists() and (tmp_path / "out" / "host" / "manifest.json").is_file()


DYNAMIC_DEPLOYMENT = """
import json, sys
import numpy as np
from tasks.runtime.bundle import Bundle
texts = json.loads(sys.argv[2])
bundle = Bundle.load(sys.argv[1], threads=1)
padded = bundle.feeds(texts, 32)
static = np.concatenate([bundle.model(32).run({k: v[i : i + 1] for k, v in padded.items()}) for i in range(len(texts))])
print(json.dumps({"dynamic": bundle.manifest.dynamic, "shapes": bundle.routes(texts).shapes.tolist(),
                  "max_abs_diff_to_padded": float(np.abs(bundle.run(texts) - static).max())}))
"""


DYNAMIC_TEXTS = ["a dog", "two men are playing chess in the park", LONG, "the cat sat on the mat while the rain fell"]


def _bundle_dynamic(tiny_dynamic: Path, tiny_bert: Path, reference32: Path, tmp_path: Path, device: str,
                    params: BundleParams) -> dict:
    """The bundle stage on the tiny BERT's dynamic export (any length up to 32), timed on DYNAMIC_TEXTS."""
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(DYNAMIC_TEXTS) + "\n")
    return bundle_run(
        sources={32: tiny_dynamic / "model_dynamic.onnx"}, compiled={}, model_dir=tiny_bert, text=inputs,
        reference_outputs=reference32, model="dense", variant="fp32_dynamic", device=device, params=params,
        text_source=TextSource(path=inputs, format="txt"), timing=MixTiming(threads=1, warmup_runs=2, worker_timeout_s=600),
        evaluation_params=EvaluationParams(sets=[STSB]), family=SENTENCE_ENCODER, out_dir=tmp_path / "out", key="k",
        dynamic=True,
    )


def test_a_dynamic_bundle_runs_each_input_at_its_own_length(tiny_dynamic, tiny_bert, reference32, tmp_path):
    """One artifact with a free token axis: every input at its own length (capped at 32, the longer one cut and
    counted), timed and scored that way; its outputs are the static 32-token model's (padding is masked out)."""
    texts, out = DYNAMIC_TEXTS, tmp_path / "out"
    payload = _bundle_dynamic(tiny_dynamic, tiny_bert, reference32, tmp_path, "ort_cpu", BundleParams(mix_samples=10))
    (row,) = payload["rows"]
    BUNDLE_ROWS.validate(pd.DataFrame(payload["rows"], columns=list(BUNDLE_ROWS.columns)))
    lengths = FAMILIES.get("sentence_encoder").input_lengths(
        FAMILIES.get("sentence_encoder").load_preprocessor(tiny_bert), texts)
    assert (row["policy"], row["shapes"], row["contexts"]) == ("dynamic", "<=32", 1)
    assert row["truncated_inputs"] == int((lengths > 32).sum()) == 1 and row["latency_mix_mean_ms"] > 0
    assert json.loads(row["bucket_counts"]) == {"32": 1}  # only the cut input runs at the full 32
    assert row["accuracy_source"] == "artifact" and row["eval_items"] == 20
    # As a deployment loads it, in a process of its own (a bundle's ORT sessions make the thread pool process-wide).
    proc = subprocess.run([sys.executable, "-c", DYNAMIC_DEPLOYMENT, str(out / "host"), json.dumps(texts)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dynamic"] and result["shapes"] == np.minimum(lengths, 32).tolist()
    assert result["max_abs_diff_to_padded"] < 2e-5
    # Scored through the bundle: the fp32 dynamic artifact gives the static 32-token reference's outputs.
    scored, reference = np.load(out / "outputs-host.npy"), np.load(reference32)
    np.testing.assert_allclose(scored, reference[: len(scored)], atol=2e-5)


def test_a_pinned_dynamic_bundle_routes_to_its_pinned_lengths_beside_the_free_artifact(
        tiny_dynamic, tiny_bert, reference32, tmp_path):
    """`bundle.pinned` on OpenVINO CPU: the one dynamic artifact compiled at 8/16/32 when the bundle loads, each input
    to the smallest length that holds it (a `pinned` row), timed interleaved with the same artifact at each input's
    own length (a `dynamic` row); both scored, and both give the static 32-token reference's outputs."""
    texts, out = DYNAMIC_TEXTS, tmp_path / "out"
    payload = _bundle_dynamic(tiny_dynamic, tiny_bert, reference32, tmp_path, "openvino_cpu",
                              BundleParams(mix_samples=10, pinned={"openvino_cpu": [8, 16, 32]}))
    BUNDLE_ROWS.validate(pd.DataFrame(payload["rows"], columns=list(BUNDLE_ROWS.columns)))
    rows = {r["policy"]: r for r in payload["rows"]}
    assert sorted(rows) == ["dynamic", "pinned"]
    pinned, free = rows["pinned"], rows["dynamic"]
    family = FAMILIES.get("sentence_encoder")
    lengths = family.input_lengths(family.load_preprocessor(tiny_bert), texts)
    expected = {str(s): int(sum(1 for n in lengths if route(np.array([n]), [8, 16, 32]).shapes[0] == s)) for s in (8, 16, 32)}
    assert (pinned["shapes"], pinned["contexts"], free["shapes"], free["contexts"]) == ("8/16/32", 3, "<=32", 1)
    assert json.loads(pinned["bucket_counts"]) == expected and sum(expected.values()) == len(texts)
    assert json.loads(free["bucket_counts"]) == {"32": 1}  # only the cut input runs at the full 32
    assert pinned["truncated_inputs"] == free["truncated_inputs"] == 1
    assert pinned["latency_mix_mean_ms"] > 0 and free["latency_mix_mean_ms"] > 0
    assert {e["policy"] for e in payload["evaluations"]} == {"pinned", "dynamic"}
    manifest = read_manifest(out / "host")
    assert manifest.dynamic and manifest.pinned == [8, 16, 32] and manifest.shapes == [32]
    reference = np.load(reference32)
    for name in ("outputs-host.npy", "outputs-host-free.npy"):  # padding is masked out: the same numbers
        scored = np.load(out / name)
        np.testing.assert_allclose(scored, reference[: len(scored)], atol=1e-4)
    deployed = Bundle.load(out / "host", threads=1)
    assert deployed.shapes == [8, 16, 32] and not deployed.free
    assert deployed.routes(texts).shapes.tolist() == [route(np.array([n]), [8, 16, 32]).shapes[0] for n in lengths]
    unpinned = Bundle.load(out / "host", threads=1, pinned=False)
    assert unpinned.free and unpinned.routes(texts).shapes.tolist() == np.minimum(lengths, 32).tolist()
    np.testing.assert_allclose(deployed.run(texts), unpinned.run(texts), atol=1e-4)


def test_a_manifest_pins_only_a_dynamic_artifact_up_to_its_maximum(tmp_path):
    bucket = [{"shape": 32, "artifact": "seq32/model.onnx"}]
    common = {"family": "sentence_encoder", "device": "openvino_cpu", "target": "host", "buckets": bucket}
    for fields, message in (({"pinned": [16, 32]}, "for a dynamic bundle"),
                            ({"dynamic": True, "pinned": [16, 24]}, "end at the artifact's maximum 32"),
                            ({"dynamic": True, "pinned": [32, 16]}, "ascending")):
        (tmp_path / "manifest.json").write_text(json.dumps({**common, **fields}))
        with pytest.raises(InputError, match=message):
            read_manifest(tmp_path)


def test_an_engine_precision_is_a_bundle_of_its_own_timed_and_scored_beside_host(
        tiny_dynamic, tiny_bert, reference32, tmp_path):
    """`bundle.precisions` on OpenVINO CPU: the dynamic artifact is also deployed with INFERENCE_PRECISION_HINT bf16
    (target host_bf16, the hint in its manifest, so a deployment loads it the same): rows of its own with the
    precision the engine reports, scored through that bundle. On CPUs with avx512_bf16 or AMX its outputs are bf16's
    (near f32's, not equal); elsewhere the plugin keeps f32 and the row says so."""
    out = tmp_path / "out"
    payload = _bundle_dynamic(tiny_dynamic, tiny_bert, reference32, tmp_path, "openvino_cpu",
                              BundleParams(mix_samples=10, precisions={"openvino_cpu": ["bf16"]}))
    BUNDLE_ROWS.validate(pd.DataFrame(payload["rows"], columns=list(BUNDLE_ROWS.columns)))
    rows = {r["target"]: r for r in payload["rows"]}
    assert sorted(rows) == ["host", "host_bf16"] and rows["host"]["precision"] == "f32"
    assert {e["target"] for e in payload["evaluations"]} == {"host", "host_bf16"}
    assert read_manifest(out / "host").engine_options == {}
    assert read_manifest(out / "host_bf16").engine_options == {"inference_precision": "bf16"}
    deployed = Bundle.load(out / "host_bf16", threads=1)
    assert deployed.precision == rows["host_bf16"]["precision"]
    # Both loaded with one engine cache: OpenVINO would hand the bf16 compile the f32 blob (f32's outputs, or a crash
    # on the free axis); each set of engine options gets a cache folder of its own.
    cache = tmp_path / "engine-cache"
    shared = [Bundle.load(out / target, threads=1, cache_dir=cache) for target in ("host", "host_bf16")]
    assert sorted(p.name for p in cache.iterdir()) == ["default", "inference_precision-bf16"]
    texts = ["a short one", "a somewhat longer sentence, with a clause or two, to embed"]
    np.testing.assert_array_equal(shared[1].run(texts), deployed.run(texts))
    f32, bf16 = np.load(out / "outputs-host.npy"), np.load(out / "outputs-host_bf16.npy")
    flags = (host_cpu()[1] or "").split()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        assert rows["host_bf16"]["precision"] == "bf16"
        assert not np.array_equal(bf16, f32)  # the hint reached the engine (f32 runs are deterministic)
        np.testing.assert_allclose(bf16, f32, atol=0.05)
    else:
        assert rows["host_bf16"]["precision"] == "f32"
        np.testing.assert_allclose(bf16, f32, atol=1e-5)


def test_a_manifest_with_options_its_backend_does_not_load_with_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({
        "family": "sentence_encoder", "device": "ort_cpu", "target": "host_bf16", "dynamic": True,
        "buckets": [{"shape": 32, "artifact": "seq32/model.onnx"}], "engine_options": {"inference_precision": "bf16"}}))
    with pytest.raises(InputError, match=r"engine_options \['inference_precision'\] are not options ort_cpu loads"):
        Bundle.load(tmp_path, threads=1)


def test_the_race_times_every_devices_bundle_rows_side_by_side(tiny_dynamic, tiny_bert, reference32, tmp_path):
    """Two bundle stage outputs (ORT CPU dynamic; OpenVINO CPU pinned and dynamic): the race times each device's
    rows in one process, interleaved, on the same inputs, over two rounds, and names each row by its bundle key."""
    (tmp_path / "ort").mkdir(), (tmp_path / "ov").mkdir()
    ort = _bundle_dynamic(tiny_dynamic, tiny_bert, reference32, tmp_path / "ort", "ort_cpu", BundleParams(mix_samples=10))
    ov = _bundle_dynamic(tiny_dynamic, tiny_bert, reference32, tmp_path / "ov", "openvino_cpu",
                         BundleParams(mix_samples=10, pinned={"openvino_cpu": [8, 16, 32]}))
    payload = race_run(bundle_dirs=[tmp_path / "ort" / "out", tmp_path / "ov" / "out"], text=tmp_path / "ort" / "inputs.txt",
                       text_source=TextSource(path=tmp_path / "ort" / "inputs.txt", format="txt"), sample=MixSample(mix_samples=10),
                       params=RaceParams(rounds=2), timing=MixTiming(threads=1, warmup_runs=2, worker_timeout_s=600),
                       family=SENTENCE_ENCODER, out_dir=tmp_path / "race", key="k")
    raced = {(r["device"], r["policy"]): r for r in payload["rows"]}
    bundled = {(r["device"], r["policy"]): r for r in [*ort["rows"], *ov["rows"]]}
    assert sorted(raced) == sorted(bundled) == [("openvino_cpu", "dynamic"), ("openvino_cpu", "pinned"),
                                                 ("ort_cpu", "dynamic")]
    for key, row in raced.items():
        assert {k: row[k] for k in BUNDLE_KEY} == {k: bundled[key][k] for k in BUNDLE_KEY}
        assert row["race_mean_ms"] > 0 and row["race_p99_ms"] >= row["race_p50_ms"] > 0
        assert (row["race_rounds"], row["race_inputs"]) == (2, len(DYNAMIC_TEXTS))
    assert raced["ort_cpu", "dynamic"]["race_arms"] == 1 and raced["openvino_cpu", "pinned"]["race_arms"] == 2
    assert (tmp_path / "race" / "stage.json").is_file()


def test_the_race_refuses_a_bundle_folder_without_its_stage_output(tmp_path):
    with pytest.raises(StageError, match="no finished bundle stage output; run the bundle stages first"):
        race_arms([tmp_path])
