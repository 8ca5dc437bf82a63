#!/usr/bin/env bash
# Wheels for a GPU machine that cannot reach a package index but already holds PyTorch (and the
# usual scientific stack): what the project, its tests and bench/benchmark.py still need there.
#
#   bench/offline_wheels.sh DIR [PYTHON_VERSION]    # here, where pip works (default Python 3.12)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#                                                   # there
#
# The packages such a machine usually has already (numpy, requests, pyyaml, regex, tqdm, safetensors,
# ...) are left out, so that the wheels stay small; set KEEP_ALL=1 to keep every dependency. With
# WITH_TRANSFORMERS=1 it adds transformers 4.57 and the tokenizers and huggingface_hub it needs (the
# baseline of the benchmark's comparisons; about 16 MB more).
set -euo pipefail
dir=${1:?usage: bench/offline_wheels.sh DIR [PYTHON_VERSION]}
py=${2:-3.12}
packages=("spacy>=3.4" "ftfy>=6.0" "pydantic")
if [[ "${WITH_TRANSFORMERS:-0}" == 1 ]]; then packages+=("transformers==4.57.*"); fi
mkdir -p "$dir"
python3 -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$dir" "${packages[@]}"
present=(numpy setuptools packaging requests urllib3 idna certifi charset_normalizer jinja2 markupsafe
         typing_extensions filelock fsspec pyyaml regex tqdm rich pygments markdown_it_py mdurl click typer
         shellingham anyio h11 httpcore httpx hf_xet safetensors wrapt annotated_doc)
if [[ "${KEEP_ALL:-0}" != 1 ]]; then
    for wheel in "$dir"/*.whl; do
        name=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z' 'a-z')
        if [[ " ${present[*]} " == *" $name "* ]]; then rm "$wheel"; fi
    done
fi
du -sh "$dir"
