#!/usr/bin/env bash
# The device checks in one call: a lent GPU has 15 minutes for a whole task, so everything runs from one script.
#   1. the GPU tests (tests/engine/test_gpu.py);
#   2. `bench` on the synthetic sets (64 single portraits, the Solvay photo, a 24-megapixel photo): the generator
#      sweep over batch sizes, then end to end with the one-face-at-a-time baseline, for GPEN-BFR-512 fp16 with
#      the knobs off (gpu-512) and for the fast preset as shipped, parser included (gpu-fast); see
#      tools/gpu-bench.toml.
# Figures go to $OUT (text and JSON). The device image has PyTorch but not all of our pure-Python dependencies;
# on the development machine (which reaches PyPI) fetch them first for the device's Python (3.12), then carry .whl
# (3 MB):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
#       facexlib==0.3.0 filterpy pydantic pydantic-core pydantic-settings python-dotenv structlog watchdog \
#       annotated-types typing-inspection simplejpeg
# The lent machine gets only the checkout, not ../shared beside it: copy the test data into shared/ (ignored by
# git; 22 MB), which the tests and `bench` look in when there is no ../shared:
#   mkdir -p shared && cp -r ../shared/models ../shared/testdata ../shared/reference shared/
#   run: bash tools/gpu-check.sh   carry: [".whl", "shared"]   timeout_s: 560 (the steps below stop by 520 s)
# The real detector and the sample photo come from ../shared (or ./shared, or $SHARED). A GPU test that skips
# (no CUDA, data not found) fails the check: a skip would look like a pass in the summary line.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
DEVICE=${DEVICE:-cuda}
REPEAT=${REPEAT:-2}
PRESETS=${PRESETS:-gpu-512 gpu-fast}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if [ -d .whl ]; then
    "$PY" -m pip install -q --no-deps --no-index --find-links .whl .whl/*.whl >"$OUT/pip.txt" 2>&1 \
        || echo "gpu-check: installing the carried wheels failed (see pip.txt)"
fi
SHARED=${SHARED:-$(for d in ../shared ./shared; do [ -f "$d/models/detection_mobilenet0.25_Final.pth" ] && echo "$d" && break; done)}
if [ -z "$SHARED" ]; then
    echo "gpu-check: no shared/ folder with models/detection_mobilenet0.25_Final.pth (set SHARED=...)" >&2
    exit 2
fi
export PYTHONPATH=$PWD
{ nvidia-smi 2>&1; "$PY" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } >"$OUT/machine.txt"
status=0
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/engine/test_gpu.py >"$OUT/gpu-tests.txt" 2>&1 || status=1
grep -q "skipped" "$OUT/gpu-tests.txt" && status=1
tail -n 5 "$OUT/gpu-tests.txt"
for preset in $PRESETS; do
    timeout 200 "$PY" -m daemon bench --config tools/gpu-bench.toml --models-dir "$SHARED/models" \
        --preset "$preset" --device "$DEVICE" --random-weights \
        --baseline --repeat "$REPEAT" --json "$OUT/bench-$preset.json" >"$OUT/bench-$preset.txt" 2>&1 || status=1
    cat "$OUT/bench-$preset.txt"
done
exit $status
