"""Check that every peer artifact loads and runs in the MAIN venv's runtimes with dynamic shapes.

    .venv/bin/python infra/peers/check_peers.py --peers artifacts/peers

For each <peers>/<name>/peer.json: load the model with the engine it names (onnxruntime or openvino, CPU), feed
each of the three sentences of <peers>/reference.npz alone (batch 1, its own token length, no padding), apply the
pooling peer.json names (mean over attention_mask, L2 normalise) and print the cosine against the fp32
sentence-transformers (torch) embedding in reference.npz. Also runs the three as one padded batch of 3 to show
the batch axis is dynamic. Writes <peers>/check_results.json. Exits 1 if a peer fails to load or run (a LOW
cosine is only flagged). Timing/accuracy comparisons are not done here.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

FEEDS = ("input_ids", "attention_mask", "token_type_ids")


def pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    e = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return e / np.clip(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12, None)


class Runner:
    def __init__(self, folder: Path, peer: dict):
        self.peer = peer
        self.engine = peer["engine"]
        path = folder / peer["model_file"]
        self.inputs = {i["name"]: np.dtype(i["dtype"]) for i in peer["inputs"]}
        self.output = peer["output_to_use"]
        if self.engine == "onnxruntime":
            import onnxruntime as ort

            so = ort.SessionOptions()
            self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            names = {i.name for i in self.sess.get_inputs()}
            assert names == set(self.inputs), (names, self.inputs)
        elif self.engine == "openvino":
            import openvino as ov

            self.compiled = ov.Core().compile_model(str(path), "CPU")
            self.out_port = self.compiled.output(self.output)
        else:
            raise ValueError(self.engine)

    def __call__(self, enc: dict[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for name, dtype in self.inputs.items():
            key = name if name in enc else next(k for k in FEEDS if k in name)
            feed[name] = enc[key].astype(dtype)
        if self.engine == "onnxruntime":
            return self.sess.run([self.output], feed)[0]
        return self.compiled(feed)[self.out_port]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=Path, default=Path(__file__).resolve().parents[2] / "artifacts/peers")
    ap.add_argument("--min-cos", type=float, default=0.95,
                    help="flag LOW below this cosine (a sanity mark, not a metric; exit status is for load/run errors)")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    ref = np.load(a.peers / "reference.npz")
    sentences = [str(s) for s in ref["sentences"]]
    ref_emb = ref["embeddings"]
    peers = sorted(p.parent for p in a.peers.glob("*/peer.json"))
    if not peers:
        print(f"no */peer.json under {a.peers}", file=sys.stderr)
        return 2
    tok_path = json.loads((peers[0] / "peer.json").read_text())["tokenizer"]["path"]
    tok = AutoTokenizer.from_pretrained(tok_path)
    singles = []
    for i, s in enumerate(sentences):
        enc = dict(tok(s, truncation=True, max_length=256, return_tensors="np"))
        if "token_type_ids" not in enc:
            enc["token_type_ids"] = np.zeros_like(enc["input_ids"])
        same = np.array_equal(enc["input_ids"], ref[f"input_ids_{i}"])
        if not same:
            print(f"tokenization differs from the peers venv for sentence {i}", file=sys.stderr)
            return 2
        singles.append(enc)
    batch = dict(tok(sentences, truncation=True, max_length=256, padding=True, return_tensors="np"))
    batch.setdefault("token_type_ids", np.zeros_like(batch["input_ids"]))

    lens = [int(e["input_ids"].shape[1]) for e in singles]
    vers = {p: metadata.version(p) for p in ("onnxruntime", "openvino", "transformers", "numpy")}
    print(f"runtimes (main venv): {vers}")
    print(f"sentences: token lengths {lens}")
    for i, s in enumerate(sentences):
        print(f"  [{i}] {s}")
    print(f"\n{'peer':28s} {'engine':12s} " + " ".join(f"cos[{i}]({n})" for i, n in enumerate(lens))
          + "  batch3-min-cos  status")

    results, bad = {}, []
    for folder in peers:
        peer = json.loads((folder / "peer.json").read_text())
        name = peer["name"]
        try:
            run = Runner(folder, peer)
            cos, shapes = [], []
            for i, enc in enumerate(singles):
                h = run(enc)
                shapes.append(list(h.shape))
                assert h.shape == (1, lens[i], 384), h.shape
                e = pool(h, enc["attention_mask"])[0]
                cos.append(float(e @ ref_emb[i] / np.linalg.norm(ref_emb[i])))
            hb = run(batch)
            assert hb.shape[:2] == batch["input_ids"].shape, hb.shape
            eb = pool(hb, batch["attention_mask"])
            bcos = float(min(eb[i] @ ref_emb[i] / np.linalg.norm(ref_emb[i]) for i in range(len(sentences))))
            ok = min(cos) >= a.min_cos and bcos >= a.min_cos
            results[name] = {"engine": peer["engine"], "cosine_batch1": cos, "output_shapes_batch1": shapes,
                             "cosine_batch3_padded_min": bcos, "loaded": True, "low": not ok}
            print(f"{name:28s} {peer['engine']:12s} " + " ".join(f"{c:>10.6f}" for c in cos)
                  + f"  {bcos:13.6f}  {'ok' if ok else 'LOW'}")
        except Exception as e:  # report and go on
            results[name] = {"engine": peer.get("engine"), "error": f"{type(e).__name__}: {e}", "loaded": False}
            bad.append(name)
            print(f"{name:28s} {peer.get('engine', '?'):12s} ERROR {type(e).__name__}: {e}")
    for f in sorted(a.peers.glob("*/FAILED.json")):
        print(f"{f.parent.name:28s} (not built: {json.loads(f.read_text())['error'][:120]})")

    (a.peers / "check_results.json").write_text(json.dumps({
        "runtimes": vers, "sentences": sentences, "token_lengths": lens, "min_cos": a.min_cos, "peers": results,
    }, indent=2) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
