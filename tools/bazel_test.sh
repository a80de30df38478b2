#!/usr/bin/env bash
# Bazel build and test of tpu_embed_adam, offline (Debian bazel-bootstrap 4.2.3).
#   tools/bazel_test.sh                          # build //... and run the Bazel tests
#   tools/bazel_test.sh //:tests/test_params     # chosen targets
#   tools/bazel_test.sh --clean                  # stop the server, delete .bazel-root
# Needs: apt bazel-bootstrap bazel-rules-java bazel-platforms protobuf-compiler
# libprotobuf-dev, and the venv (`make venv`; or TPU_EMBED_ADAM_PYTHON=/path/python).
# Bazel's state lives in <project>/.bazel-root (gitignored); BAZEL_OUTPUT_USER_ROOT
# overrides it. More parallelism on a big box:
#   BAZEL_FLAGS="--jobs=8 --local_cpu_resources=8" tools/bazel_test.sh
# After changing the venv (TF version, packages): tools/bazel_test.sh --clean.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
user_root="${BAZEL_OUTPUT_USER_ROOT:-$root/.bazel-root}"
apt_line="apt-get install -y bazel-bootstrap bazel-rules-java bazel-platforms protobuf-compiler libprotobuf-dev"

if [[ "${1:-}" == "--clean" ]]; then
  if [[ -d "$user_root" ]]; then
    if command -v bazel >/dev/null; then
      bazel --output_user_root="$user_root" shutdown 2>/dev/null || true
    fi
    chmod -R u+w "$user_root" 2>/dev/null || true
    rm -rf "$user_root"
  fi
  rm -f bazel-bin bazel-out bazel-testlogs "bazel-$(basename "$root")"
  exit 0
fi

if ! command -v bazel >/dev/null; then
  echo "bazel_test.sh: no bazel on PATH. Install: $apt_line" >&2
  exit 2
fi
if ! command -v protoc >/dev/null; then
  echo "bazel_test.sh: no protoc on PATH. Install: $apt_line" >&2
  exit 2
fi
python="${TPU_EMBED_ADAM_PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
  echo "bazel_test.sh: no $python: run \`make venv\` first (or set TPU_EMBED_ADAM_PYTHON)." >&2
  exit 2
fi

targets=("$@")
if [[ ${#targets[@]} -eq 0 ]]; then
  targets=(//...)
fi

bazel=(bazel --output_user_root="$user_root")
# shellcheck disable=SC2206
extra=(${BAZEL_FLAGS:-})
start=$(date +%s)
status=0
"${bazel[@]}" test --nosandbox_debug "${extra[@]}" -- "${targets[@]}" || status=$?
elapsed=$(($(date +%s) - start))

# One line per test target: the pytest summary from its log.
if [[ -d bazel-testlogs ]]; then
  query="tests(set(${targets[*]}))"
  while read -r label; do
    [[ -n "$label" ]] || continue
    log="bazel-testlogs/${label#//:}/test.log"
    log="${log/\/\///}"
    if [[ -f "$log" ]]; then
      summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|no tests ran|^pytest_main: (not|ok)' "$log" | tail -n 1 || true)
      printf '  %-40s %s\n' "$label" "${summary:-(see $log)}"
    fi
  done < <("${bazel[@]}" query --noshow_progress "$query" 2>/dev/null || true)
fi
echo "bazel_test.sh: bazel test exited $status after ${elapsed} s"
exit "$status"
