#!/bin/sh
# IQN: set the server-to-client bottleneck on a router interface.
# usage: shape.sh IFACE RATE   (RATE as tc writes it, e.g. 1mbit or 300kbit; "none" removes it)
set -eu
if [ "$#" -ne 2 ]; then
	echo "usage: $0 IFACE RATE|none" >&2
	exit 2
fi
# shellcheck source-path=SCRIPTDIR source=shaping.env
. "$(dirname "$0")/shaping.env"
if [ "$2" = none ]; then
	tc qdisc del dev "$1" root 2>/dev/null || true
	exit 0
fi
tc qdisc replace dev "$1" root tbf rate "$2" burst "$TBF_BURST_BYTES" latency "${TBF_LATENCY_MS}ms"
