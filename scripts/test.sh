#!/usr/bin/env bash
# Install everything, then run every test (as root: XDP, namespaces, OpenVPN and
# the browser tests run for real; with CI=true none of them may skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check iqn_ctl iqn_lab user_agent iqn_qos iqn_common tests bench
.venv/bin/mypy
.venv/bin/lint-imports  # the layering contracts of pyproject.toml (docs/architecture.md)
exec .venv/bin/python -m pytest "$@"
