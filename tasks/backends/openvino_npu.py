"""OpenVINO on the NPU plugin (Intel Core Ultra). Never AUTO: no NPU means unavailable, not CPU.

The NPU compiles static shapes only and runs float models in f16 by default (reported in
`precision`); `threads` does not apply to the NPU itself and is ignored. On a machine without an
NPU, `offline_bundle` leaves what a machine with one needs to compile the model itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.backends._openvino import IR_FILE, OpenVinoBackend, OpenVinoModel, ov_versions
from tasks.core.fingerprint import write_json_atomic

NPU_CONFIG_FILE = "npu_config.json"
NPU_CACHE_DIR = "cache"
"""CACHE_DIR in npu_config.json, relative to the bundle: the first compile fills it, later ones load from it."""


class OpenVinoNpuBackend(OpenVinoBackend):
    def __init__(self, inference_precision: str | None = None, cache_dir=None):
        super().__init__("openvino_npu", "NPU", inference_precision=inference_precision, cache_dir=cache_dir)

    def accelerator_nodes(self, placement: dict) -> int:
        return int(sum(n for ep, n in placement["nodes_per_ep"].items() if ep != "CPU"))

    def offline_bundle(self, model: Path, out_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
        """Write the static IR (model.xml/.bin, fp32 weights) and npu_config.json (device, plugin config
        with a relative CACHE_DIR, a one-line compile command) into `out_dir`; returns files, options and
        the versions of the tools that wrote the IR."""
        import openvino as ov

        out_dir = Path(out_dir)
        config = {**self.plugin_config(options), "CACHE_DIR": NPU_CACHE_DIR}
        source = self.read_model(model, require_static=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        ir = out_dir / IR_FILE
        ov.save_model(source, str(ir), compress_to_fp16=False)
        write_json_atomic(
            out_dir / NPU_CONFIG_FILE,
            {
                "device": self.device,
                "config": config,
                "how_to_compile": (
                    "cd <this folder> && python -c \"import json, openvino as ov; "
                    f"c = json.load(open('{NPU_CONFIG_FILE}')); ov.Core().compile_model('{IR_FILE}', c['device'], "
                    "c['config'])\""
                ),
            },
        )
        return {"files": [IR_FILE, ir.with_suffix(".bin").name, NPU_CONFIG_FILE], "options": config,
                "versions": ov_versions()}


BACKEND = OpenVinoNpuBackend()

__all__ = ["BACKEND", "OpenVinoModel", "OpenVinoNpuBackend"]
