#!/usr/bin/env bash
# The accelerator check in one command: on a GPU or TPU host, the benchmark suite
# (python -m benchmarks.run --quick) and the train-step tests, results under OUT.
#
#   benchmarks/accelerator_check.sh OUT [WHEELS]      # on the accelerator host, repo root
#   benchmarks/accelerator_check.sh --prepare WHEELS [PYTHON_VERSION]   # where pip reaches PyPI
#
# The host needs Python with JAX for its accelerator, flax, optax, orbax-checkpoint, numpy,
# torch (the PyTorch baselines) and pytest. What else the project needs
# (benchmarks/accelerator_requirements.txt: tensorflow-datasets, ml-collections, array_record,
# tensorboardX, scikit-learn and their small dependencies) comes from WHEELS, installed with --no-index
# --no-deps into a folder of its own, so a host that reaches no package registry works.
# Prepare WHEELS beforehand on a machine that reaches PyPI with --prepare (PYTHON_VERSION: the
# accelerator host's, default 3.12; Linux x86-64 wheels) and copy it over with the checkout.
#
# OUT receives: device.txt (the accelerator, by name), benchmarks.json/.md (benchmarks.run
# --quick), tests.txt (the train-step tests, pytest's summary) and check.log (everything).
# Commit OUT's files to benchmarks/results/ under the device's name. The exit status is the
# tests' (benchmark failures are recorded in benchmarks.json, as benchmarks.run records them).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == --prepare ]]; then
  wheels=${2:?usage: $0 --prepare WHEELS [PYTHON_VERSION]}
  version=${3:-3.12}
  mkdir -p "$wheels"
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  grep -v '^#' benchmarks/accelerator_requirements.txt | grep -v '^promise==' \
    | xargs "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version "$version" \
        --implementation cp "${platforms[@]}" -d "$wheels"
  # promise is published as source only (pure Python): built into a wheel here, where pip
  # reaches setuptools, so the host installs wheels alone.
  grep '^promise==' benchmarks/accelerator_requirements.txt \
    | xargs "$PYTHON" -m pip wheel --no-deps --no-binary=promise -w "$wheels"
  du -sh "$wheels"
  exit 0
fi

out=${1:?usage: $0 OUT [WHEELS]  (or --prepare WHEELS)}
wheels=${2:-}
mkdir -p "$out"
exec > >(tee -a "$out/check.log") 2>&1

if [[ -n "$wheels" ]]; then
  if ! compgen -G "$wheels/promise-*.whl" > /dev/null; then
    echo "accelerator_check.sh: $wheels has no promise wheel (prepared by an older version?):" \
      "run --prepare again" >&2
    exit 1
  fi
  site=${TMPDIR:-/tmp}/dsf3n-accelerator-site
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$site" "$wheels"/*.whl || exit 1
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

"$PYTHON" - > "$out/device.txt" <<'EOF' || exit 1
import jax
devices = jax.devices()
print(f"backend: {jax.default_backend()}; devices: {len(devices)} x {devices[0].device_kind}")
print(f"jax {jax.__version__}")
EOF
cat "$out/device.txt"

"$PYTHON" -m benchmarks.run --quick --out "$out" --name benchmarks
echo "benchmarks.run exit status: $?"

# The train-step tests (tests/test_train.py, tests/test_loop.py without the subprocess runs):
# the step, the on-device epoch and chunk, runs resumed from mid-epoch, the loop's actions.
# Tests that compare more devices than the host has skip, naming the count. At XLA's default
# optimisation, as users' runs compile (the CPU suite turns most of it off: tests/conftest.py).
# pyproject's addopts name pytest-xdist's --dist, which the host may lack: replaced here.
JAX_DISABLE_MOST_OPTIMIZATIONS=0 "$PYTHON" -m pytest -q -rs -o addopts= -p no:cacheprovider \
  tests/test_train.py tests/test_loop.py -m "not slow" 2>&1 | tee "$out/tests.txt"
exit "${PIPESTATUS[0]}"
