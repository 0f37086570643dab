#!/bin/sh
# Sekisho beside a private Postfix relay, side by side (issue 7). Options: bench/compare.py --help
exec "${PYTHON:-python3}" "$(dirname "$0")/compare.py" "$@"
