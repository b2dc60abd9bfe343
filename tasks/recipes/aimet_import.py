"""Recipe `aimet_import`: an AIMET export made elsewhere (the float ONNX model and the `.encodings` JSON that
`QuantizationSimModel.export` writes) turned into the QDQ model the `qnn_htp` backend compiles.

aimet-onnx's `encodings_to_onnx_qdq` places exactly the quantizers the encodings name (no QuantSim config
adds or drops one). Before it runs, the recipe refuses with one line: an encodings file that is not AIMET's
(or of a version it does not read), one that names a tensor the model lacks, a bit width the HTP cannot
run, and a model whose inputs the pipeline cannot feed. The export should be of the graph edgeopt
quantizes (`artifacts/graph_surgery/<model>/seq<L>/model.onnx`, prepared as `aimet_qnn` prepares it), so
that its outputs compare with the pipeline's reference. Paths may hold `{model}` and `{seq_len}`: one
export per pipeline model and length, each keyed into its quantize stage with the files it reads.
"""

from __future__ import annotations

import json
import re
import string
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from tasks.core.errors import InputError
from tasks.core.onnx_graph import input_specs, load_model
from tasks.recipes._ort import onnx_quant_counts
from tasks.recipes.aimet_qnn import quiet_aimet
from tasks.recipes.base import ONNX_ARTIFACT, RecipeContext, RecipeSettings, refuse_huge_mask_fill
from tasks.transforms.quant_rewrites import int32_biases

PLACEHOLDERS = frozenset({"model", "seq_len"})
VERSIONS = ("1.0.0", "2.0.0", "2.1.0")
# What the HTP runs (Qualcomm's QNN HTP op definitions): integer activations at 8 or 16 bits, integer
# weights at 4, 8 or 16 bits, int32 biases, and float16 (left unquantized in the QDQ graph).
HTP_BITS = {"activation": {8, 16}, "param": {4, 8, 16, 32}}
HTP_FLOAT_BITS = {16}
_DTYPE = re.compile(r"(u?int|float)(\d+)")


class AimetImportSettings(RecipeSettings):
    """An AIMET export: `onnx` and `encodings` paths, with `{model}` / `{seq_len}` for the instance."""

    method: Literal["aimet_import"] = "aimet_import"
    onnx: str = Field(description="the float ONNX model of the export (may hold {model} and {seq_len})")
    encodings: str = Field(description="its AIMET encodings JSON, format 1.0.0 or 2.x (same placeholders)")

    @field_validator("onnx", "encodings")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}; write placeholders as {{model}} and {{seq_len}}") from None
        unknown = names - PLACEHOLDERS
        if unknown:
            raise ValueError(f"{value!r}: unknown placeholder(s) {sorted(unknown)}; use {{model}} and {{seq_len}}")
        return value

    def imports(self, model: str, seq_len: int) -> dict[str, Path]:
        """The export's files for one pipeline model and length, external weights included (so an edit to any
        of them reruns the variant)."""
        onnx_path = Path(self.onnx.format(model=model, seq_len=seq_len))
        files = {"onnx": onnx_path, "encodings": Path(self.encodings.format(model=model, seq_len=seq_len))}
        if onnx_path.is_file():
            for i, name in enumerate(_external_data(onnx_path)):
                files[f"onnx_data_{i}"] = onnx_path.with_name(name)
        return files


def _external_data(path: Path) -> list[str]:
    """The external-data files an ONNX model's initializers name (AIMET moves large weights to `<name>.data`)."""
    proto = load_model(path, weights=False, hint="point quantize.variants.<name>.onnx at the exported model")
    found = []
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in found:
                found.append(entry.value)
    return found


def read_encodings(path: Path) -> tuple[dict, list[tuple[str, str, str, int]]]:
    """The JSON document and its entries as (tensor, kind, dtype, bits): kind `activation`, `param` or
    `tensor` (2.x does not say), dtype `int` or `float`. InputError for anything else."""
    hint = "point the variant's `encodings` at the .encodings file aimet-onnx's QuantizationSimModel.export wrote"
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: encodings file not found; {hint}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a JSON encodings file ({exc.__class__.__name__}); {hint}") from None
    version = doc.get("version") if isinstance(doc, dict) else None
    if version not in VERSIONS:
        raise InputError(f"{path}: encodings version {version!r}; edgeopt reads {', '.join(VERSIONS)} "
                         "(re-export with encoding_version='1.0.0')")
    entries = []
    try:
        if version == "1.0.0":
            for kind in ("activation", "param"):
                for e in doc[f"{kind}_encodings"]:
                    entries.append((e["name"], kind, str(e["dtype"]).lower(), int(e["bw"])))
        else:
            for e in doc["encodings"]:
                match = _DTYPE.fullmatch(str(e["output_dtype"]))
                if not match:
                    raise InputError(f"{path}: {e['name']}: output_dtype {e['output_dtype']!r} is not an integer or "
                                     "float type the HTP runs")
                dtype = "float" if match[1] == "float" else "int"
                entries.append((e["name"], "tensor", dtype, int(match[2])))
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{path}: malformed {version} encodings ({exc.__class__.__name__}: {exc}); {hint}") from None
    if not entries:
        raise InputError(f"{path}: holds no encodings; {hint}")
    return doc, entries


def check_export(model: Path, export: Path, encodings: Path) -> dict:
    """Everything that can be refused before aimet-onnx runs; returns counts for the stage record."""
    proto = load_model(export, hint="point the variant's `onnx` at the model aimet-onnx exported")
    _, entries = read_encodings(encodings)
    graph = proto.graph
    tensors = ({i.name for i in graph.input} | {i.name for i in graph.initializer}
               | {o for n in graph.node for o in n.output})
    missing = [name for name, *_ in entries if name not in tensors]
    if missing:
        raise InputError(f"{encodings}: names {len(missing)} tensor(s) {export.name} lacks (e.g. {missing[0]!r}); "
                         "use the encodings exported with this model")
    for name, kind, dtype, bits in entries:
        allowed = HTP_FLOAT_BITS if dtype == "float" else HTP_BITS.get(kind, HTP_BITS["activation"] | HTP_BITS["param"])
        if bits not in allowed:
            raise InputError(f"{encodings}: {name} is {dtype}{bits} ({kind}); the HTP runs {kind} encodings as "
                             f"{', '.join(f'{dtype}{b}' for b in sorted(allowed))}; re-export at a bit width it runs")
    want = {spec.name: spec for spec in input_specs(model)[0]}
    for spec in input_specs(proto)[0]:
        ours = want.get(spec.name)
        if ours is None or tuple(ours.shape) != tuple(spec.shape):
            fed = ", ".join(f"{s.name}{list(s.shape)}" for s in want.values())
            raise InputError(f"{export}: input {spec.name}{list(spec.shape)} is not one the pipeline feeds at this "
                             f"length ({fed}); export the graph edgeopt quantizes (graph_surgery output)")
    refuse_huge_mask_fill(export)
    return {"float16_tensors": sum(1 for _, _, dtype, _ in entries if dtype == "float"),
            "encoded_tensors": len(entries)}


def _to_qdq(export: Path, encodings: Path, out: Path) -> int:
    import onnx
    from aimet_onnx.quantsim import encodings_to_onnx_qdq

    quiet_aimet()
    qdq = encodings_to_onnx_qdq(str(export), str(encodings), prequantize_constants=True)
    biases = int32_biases(qdq.graph)  # as in aimet_qnn: the QNN EP groups a Gemm with an int32 bias only
    onnx.checker.check_model(qdq)
    onnx.save(qdq, str(out))
    return biases


class AimetImportRecipe:
    method = "aimet_import"
    settings = AimetImportSettings
    artifact = ONNX_ARTIFACT
    companions = ()
    dynamic_shapes = False  # an import names tensors of one static graph
    tools = ("onnx", "onnxruntime", "aimet-onnx")

    def needs_calibration(self, settings: AimetImportSettings) -> bool:
        return False  # the encodings are the calibration

    def check(self, model: Path, settings: AimetImportSettings) -> None:
        return None  # the export's files are known per instance: apply checks them before any work

    def apply(self, model: Path, feeds, settings: AimetImportSettings, context: RecipeContext, out: Path,
              tmp: Path) -> dict:
        export, encodings = context.imports.get("onnx"), context.imports.get("encodings")
        if export is None or encodings is None:
            raise InputError("quantize variant aimet_import: its export files were not passed; run it through "
                             "`edgeopt run` or `edgeopt stage quantize`")
        facts = check_export(Path(model), Path(export), Path(encodings))
        # A process of its own, as for aimet_qnn: AIMET registers its ops in ONNX Runtime's process-wide registry.
        with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
            biases = pool.submit(_to_qdq, Path(export), Path(encodings), out).result()
        return {**facts, "int32_biases": biases, "imported": {k: Path(v).as_posix() for k, v in context.imports.items()}}

    def counts(self, artifact: Path) -> dict:
        return onnx_quant_counts(artifact)


RECIPE = AimetImportRecipe()
