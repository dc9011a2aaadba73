#!/usr/bin/env bash
# GPU check of flare_jax on a machine with an NVIDIA GPU and the image's own jax[cuda]:
# the GPU code path (plain XLA convs, no CPU chunking) passes the unit tests of the encoders and
# both agents, and the benchmarks give GPU figures. Packages missing from the image travel as
# wheels in .whl/ (rlax and its deps, dm-haiku, tensorboardX); envpool and MuJoCo are not needed
# here, so the end-to-end Atari part of `bench rainbow` stops at its env (reported, not hidden).
#   bash scripts/gpu_check.sh OUT_DIR [bench|tests|all]    (bench ~5 min, tests ~6 min on an H200)
# Measured with it: results/gpu/.
set -u
OUT=${1:-gpu_out}; PART=${2:-all}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FLARE_JAX_TCMALLOC=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi -L | tee "$OUT/device.txt"
python3 -c "import jax, flax, optax, chex, rlax; print('jax', jax.__version__, 'flax', flax.__version__, \
'optax', optax.__version__, 'chex', chex.__version__, 'rlax', rlax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
run() {  # name, seconds, command...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit ${secs}s)"; local t0=$(date +%s)
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  grep -v '^{' "$OUT/$name.txt" | grep -v -i "tpu\|xla_bridge" | tail -25
  echo "=== $name: exit $rc after $(( $(date +%s) - t0 )) s"
}
if [ "$PART" != tests ]; then
  run sac_update 120 python3 -m experiments.bench sac_update --repeats=5
  run seeds 100 python3 -m experiments.bench seeds --num_seeds=1,4,8,16 --repeats=3
  run rainbow 90 python3 -m experiments.bench rainbow --repeats=3 --e2e_frames=8000
  # the device mesh on all local GPUs; its runs need envpool (DMC, Atari): without it (the lent
  # H200 image) this part stops at its env, reported, not hidden
  NGPU=$(nvidia-smi -L | wc -l)
  run scaling 240 python3 -m experiments.bench scaling --devices="$NGPU" --repeats=3 \
    --scaling_cases=state_sac,pixel_sac,rainbow
fi
if [ "$PART" != bench ]; then
  # unit tests on the GPU at full float32 precision (the CPU tolerances assume no TF32)
  JAX_DEFAULT_MATMUL_PRECISION=highest run tests 420 python3 -m pytest -q -m "not slow" \
    tests/test_encoders.py tests/test_sac.py tests/test_rainbow.py tests/test_augment.py
fi
