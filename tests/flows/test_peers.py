"""Peer exports for `edgeopt peers`: bad descriptions are one line; token-embedding outputs are pooled as their users
pool them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from flows.peers import read_peers
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
