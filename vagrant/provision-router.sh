#!/usr/bin/env bash
# IQN router VM: OpenVPN server, NAT toward the Internet, the bottleneck, the ISP agent.
# Uses the lab's templates (in the synced repository, /iqn).
set -euo pipefail
: "${IQN_CLIENT_FP:?client certificate fingerprint}" "${IQN_ACCESS_IP:?router access address}"
IQN_RATE=${IQN_RATE:-none}
IQN_WAN_IP=${IQN_WAN_IP:-}
IQN_AGENT=${IQN_AGENT:-0}
T=/iqn/iqn_lab/templates
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /iqn/vagrant/lib.sh

apt_need openvpn nftables iproute2 rsync

# Interfaces: the WAN (the NIC with IQN_WAN_IP, else the default route's, toward
# YouTube) and the access link to the client.
ifname_of() { ip -o -4 addr show | awk -v ip="$1" '$4 ~ "^"ip"/" {print $2; exit}'; }
if [ -n "$IQN_WAN_IP" ]; then
	wan=$(ifname_of "$IQN_WAN_IP")
else
	wan=$(ip -o route show default | awk '{print $5; exit}')
fi
access=$(ifname_of "$IQN_ACCESS_IP")
if [ -z "$wan" ] || [ -z "$access" ]; then
	echo "provision-router: cannot find WAN ($wan) or access ($access) interface" >&2
	exit 1
fi

# OpenVPN server, peer-fingerprint mode (no CA, no static key).
install -d -m 0700 /etc/openvpn/server
install -m 0600 /tmp/iqn-pki/server.key /etc/openvpn/server/iqn-server.key
install -m 0644 /tmp/iqn-pki/server.crt /etc/openvpn/server/iqn-server.crt
rm -rf /tmp/iqn-pki # the next `vagrant provision` uploads it anew (into a fresh directory)
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
echo "$wan" >/etc/iqn/wan
echo "$access" >/etc/iqn/access
if [ "$IQN_AGENT" = 1 ]; then
	# the packaged unit (packaging/systemd), as on a real router: its own user, least privilege
	id iqn >/dev/null 2>&1 ||
		useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin iqn
	install -m 0644 /iqn/packaging/systemd/iqn-ctl@.service /etc/systemd/system/
	systemctl daemon-reload
	systemctl enable "iqn-ctl@$(systemd-escape "$wan")"
	systemctl restart "iqn-ctl@$(systemd-escape "$wan")"
	echo "router ready: the ISP agent runs on $wan (systemctl status iqn-ctl@$wan; sudo iqn-ctl status)"
else
	echo "router ready: attach the ISP agent with: sudo iqn-ctl attach $wan"
fi
echo "change the bottleneck with: sudo /etc/iqn/shape.sh $access 1mbit   (or none)"
