#!/usr/bin/env bash
# The main job, end to end (run as root; `sudo make demo`): install what is
# needed, then build the lab, attach the ISP agent (XDP) on the router, play the
# emulator's video in headful Chromium on Xvfb through the OpenVPN tunnel, let
# the end-user agent signal the stalls a bottleneck timetable causes, and print
# and save the report under results/demo-<time>/. Everything is torn down at
# the end, also on Ctrl-C. Options go to `iqn-lab demo` (see --help).
# `scripts/demo.sh --paper` instead replays the paper's shipped traces (quick).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--paper" ]; then
  shift
  exec bash scripts/paper-demo.sh "$@"
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: run as root (sudo make demo): namespaces, XDP and OpenVPN need it" >&2
  exit 1
fi
bash scripts/setup.sh
exec .venv/bin/iqn-lab demo "$@"
