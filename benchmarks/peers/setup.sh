#!/usr/bin/env bash
# Builds benchmarks/peers/.venv: torch 2.13.0 (CPU), moesaic from this repo, and the peer MoE
# libraries that install on a CPU machine. Never used by CI or the tests.
#   bash benchmarks/peers/setup.sh
# Peers left out: Tutel (not on PyPI), Megablocks, ScatterMoE, FastMoE (CUDA only).
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
PY="$VENV/bin/python"
CONSTRAINTS="$VENV/constraints.txt"
SIDE="$VENV/side-transformers-4.51.3"   # transformers for ColossalAI only (on its PYTHONPATH)

step() {  # step SECONDS NAME CMD...: bounded, logged, never aborts the script
  local secs="$1" name="$2"; shift 2
  echo "== $name"
  timeout "$secs" "$@"
  local rc=$?
  if [ "$rc" -eq 0 ]; then echo "== $name: ok"; return 0; fi
  echo "== $name: FAILED (exit $rc)"; return 1
}

PIPC=("$PY" -m pip install --constraint "$CONSTRAINTS")  # torch pinned in every install

if [ ! -x "$PY" ]; then
  step 120 "venv" python3 -m venv "$VENV" || exit 1
fi
echo "torch==2.13.0" > "$CONSTRAINTS"
step 600 "torch 2.13.0 (CPU wheel)" "${PIPC[@]}" "torch==2.13.0" || exit 1
step 300 "moesaic (editable, no deps)" "${PIPC[@]}" --no-deps -e "$REPO" || exit 1
step 300 "common deps" "${PIPC[@]}" numpy pytest || true

step 900 "fairscale" "${PIPC[@]}" fairscale==0.4.13 || true
step 900 "deepspeed" env DS_BUILD_OPS=0 "${PIPC[@]}" deepspeed==0.19.8 || true
step 900 "transformers" "${PIPC[@]}" "transformers>=5,<6" || true

# ColossalAI: its normal install replaces torch, so install the sdist without deps, then the few
# runtime deps it imports; it wants transformers 4.51.3, kept in a side folder.
DL="$VENV/dl"
mkdir -p "$DL"
if step 600 "colossalai download" "$PY" -m pip download --no-deps colossalai==0.5.0 -d "$DL" &&
   step 900 "colossalai install" env -u BUILD_EXT "${PIPC[@]}" --no-deps --no-build-isolation "$DL"/colossalai-0.5.0.tar.gz &&
   step 900 "colossalai deps" "${PIPC[@]}" peft==0.13.2 contexttimer galore-torch==1.0 requests &&
   step 600 "colossalai side transformers" "$PY" -m pip install --no-deps --target "$SIDE" \
     transformers==4.51.3 tokenizers==0.21.4 huggingface_hub==0.36.2; then
  echo "colossalai: installed (transformers 4.51.3 in $SIDE)"
else
  echo "colossalai: SKIPPED (install failed; run.py reports it as not installed)"
fi

echo "== installed versions"
"$PY" - <<'PY'
import importlib.metadata as md
for name in ("torch", "moesaic", "deepspeed", "fairscale", "transformers", "colossalai"):
    try:
        print(f"{name:14s} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name:14s} not installed")
PY
"$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') and not torch.cuda.is_available() and torch.version.cuda is None else 1)" \
  && echo "torch is the 2.13.0 CPU build" || { echo "torch is NOT the 2.13.0 CPU build"; exit 1; }
