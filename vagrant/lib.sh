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

# apt_need PACKAGE... : install the packages that are missing (none on the local
# box, which has them all: provisioning then needs no download).
apt_need() {
	local p missing=()
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# install the project (ISP agent, end-user agent) from the synced repository:
# on the local box into its venv (/opt/iqn/venv has the dependencies; nothing is
# downloaded), elsewhere with the project's own setup script.
install_iqn() {
	if [ -x /opt/iqn/venv/bin/python ]; then
		/opt/iqn/venv/bin/python -m pip install -q --no-deps --no-index --no-build-isolation -e /iqn
		ln -sfn /opt/iqn/venv /opt/iqn/.venv # the path of packaging/systemd's unit
		ln -sf /opt/iqn/venv/bin/iqn-ctl /usr/local/bin/iqn-ctl
	elif [ -f /iqn/scripts/setup.sh ]; then
		(cd /iqn && bash scripts/setup.sh)
		install -d /opt/iqn
		ln -sfn /iqn/.venv /opt/iqn/.venv
		ln -sf /iqn/.venv/bin/iqn-ctl /usr/local/bin/iqn-ctl
	fi
}
