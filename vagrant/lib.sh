#!/usr/bin/env bash
# Shared by the IQN provisioning scripts: fill the lab's templates the same way
# iqn_lab/templates.py does (every @KEY@ must get a value).

# render TEMPLATE KEY=VALUE... : print TEMPLATE with each @KEY@ replaced.
render() {
	local tpl=$1 text kv
	shift
	text=$(<"$tpl")
	for kv in "$@"; do
		text=${text//@${kv%%=*}@/${kv#*=}}
	done
	if grep -qE '@[A-Z_]+@' <<<"$text"; then
		echo "render: $tpl: unfilled placeholder $(grep -oE '@[A-Z_]+@' <<<"$text" | head -n 1)" >&2
		return 1
	fi
	printf '%s\n' "$text"
}

# install the project (ISP agent, end-user agent) from the synced repository.
install_iqn() {
	if [ -f /iqn/scripts/setup.sh ]; then
		(cd /iqn && bash scripts/setup.sh)
	fi
}
