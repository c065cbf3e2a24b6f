#!/usr/bin/env bash
# IQN router VM: OpenVPN server, NAT toward the Internet, the bottleneck, the ISP agent.
# Uses the lab's templates (uploaded to /tmp/iqn/templates by the Vagrantfile).
set -euo pipefail
: "${IQN_CLIENT_FP:?client certificate fingerprint}" "${IQN_ACCESS_IP:?router access address}"
IQN_RATE=${IQN_RATE:-none}
T=/tmp/iqn/templates
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /tmp/iqn/lib.sh

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends openvpn nftables iproute2 rsync

# Interfaces: the WAN (default route, toward YouTube) and the access link to the client.
wan=$(ip -o route show default | awk '{print $5; exit}')
access=$(ip -o -4 addr show | awk -v ip="$IQN_ACCESS_IP" '$4 ~ "^"ip"/" {print $2; exit}')
if [ -z "$wan" ] || [ -z "$access" ]; then
	echo "provision-router: cannot find WAN ($wan) or access ($access) interface" >&2
	exit 1
fi

# OpenVPN server, peer-fingerprint mode (no CA, no static key).
install -d -m 0700 /etc/openvpn/server
install -m 0600 /tmp/iqn/server.key /etc/openvpn/server/iqn-server.key
install -m 0644 /tmp/iqn/server.crt /etc/openvpn/server/iqn-server.crt
render "$T/openvpn-server.conf" TUN_NET=198.18.8.0 TUN_DEV=tun0 PORT=1194 \
	CERT=/etc/openvpn/server/iqn-server.crt KEY=/etc/openvpn/server/iqn-server.key \
	CLIENT_FP="$IQN_CLIENT_FP" >/etc/openvpn/server/iqn.conf
systemctl enable openvpn-server@iqn
systemctl restart openvpn-server@iqn

# Forwarding and NAT: only tunnel traffic goes out of the WAN interface.
echo "net.ipv4.ip_forward=1" >/etc/sysctl.d/60-iqn.conf
sysctl -q -p /etc/sysctl.d/60-iqn.conf
install -d /etc/nftables.d
render "$T/nat.nft" TUN_DEV=tun0 WAN_IF="$wan" TUN_NET=198.18.8.0 >/etc/nftables.d/iqn.nft
grep -q 'include "/etc/nftables.d/iqn.nft"' /etc/nftables.conf ||
	echo 'include "/etc/nftables.d/iqn.nft"' >>/etc/nftables.conf
systemctl enable nftables
nft -f /etc/nftables.d/iqn.nft

# Bottleneck on the server-to-client direction (egress toward the client).
install -d /etc/iqn
install -m 0755 "$T/shape.sh" /etc/iqn/shape.sh
install -m 0644 "$T/shaping.env" /etc/iqn/shaping.env
/etc/iqn/shape.sh "$access" "$IQN_RATE"

install_iqn
echo "router ready: attach the ISP agent with: sudo /iqn/.venv/bin/iqn-ctl attach $wan"
echo "change the bottleneck with: sudo /etc/iqn/shape.sh $access 1mbit   (or none)"
