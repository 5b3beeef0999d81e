#!/usr/bin/env bash
# Print the path of a Python >= 3.12 (JAX >= 0.11 needs it), searching PATH, then pyenv, then /usr.
set -u
candidates=(python3.13 python3.12 python3 python)
for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]* /usr/local/bin /usr/bin; do
  for exe in "$dir"/bin/python3 "$dir"/python3.13 "$dir"/python3.12; do
    [ -x "$exe" ] && candidates+=("$exe")
  done
done
for c in "${candidates[@]}"; do
  if "$c" -c 'import sys, venv; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    command -v "$c"
    exit 0
  fi
done
echo "error: no Python >= 3.12 found (looked on PATH and in pyenv); install one, e.g. 'pyenv install 3.12'" >&2
exit 1
