#!/usr/bin/env bash
# IQN client VM: desktop session, Chromium, OpenVPN client sending all traffic
# through the router, and the end-user agent. Uses the lab's templates.
set -euo pipefail
: "${IQN_SERVER_FP:?server certificate fingerprint}" "${IQN_SERVER_IP:?router access address}"
T=/iqn/iqn_lab/templates
# shellcheck source-path=SCRIPTDIR source=lib.sh
. /iqn/vagrant/lib.sh

IQN_DESKTOP=${IQN_DESKTOP:-1}

apt_need openvpn iproute2 rsync
if [ "$IQN_DESKTOP" = 1 ]; then
	apt_need xfce4 lightdm xserver-xorg dbus-x11 chromium chromium-driver python3-tk scrot
	systemctl set-default graphical.target
fi

install -d -m 0700 /etc/openvpn/client
install -m 0600 /tmp/iqn-pki/client.key /etc/openvpn/client/iqn-client.key
install -m 0644 /tmp/iqn-pki/client.crt /etc/openvpn/client/iqn-client.crt
rm -rf /tmp/iqn-pki # the next `vagrant provision` uploads it anew (into a fresh directory)
render "$T/openvpn-client.conf" TUN_DEV=tun0 SERVER_ADDR="$IQN_SERVER_IP" PORT=1194 \
	CERT=/etc/openvpn/client/iqn-client.crt KEY=/etc/openvpn/client/iqn-client.key \
	SERVER_FP="$IQN_SERVER_FP" >/etc/openvpn/client/iqn.conf
systemctl enable openvpn-client@iqn
systemctl restart openvpn-client@iqn

install_iqn
if [ "$IQN_DESKTOP" = 1 ]; then
	systemctl start lightdm || true
	echo "client ready: log in to the desktop (vagrant/vagrant), open YouTube in Chromium,"
	echo "and start the end-user agent from /iqn (see README)."
else
	echo "client ready (headless): the signal player stands for the browser and the end-user agent:"
	echo "  /opt/iqn/venv/bin/python -m iqn_lab.player --www ADDR --media ADDR --duration 60 --log-dir /tmp/p"
fi
