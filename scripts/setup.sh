#!/usr/bin/env bash
# Install everything IQN needs on a fresh Debian/Ubuntu box (run as root):
# Debian packages, kernel headers for bcc, and a venv in .venv with the project.
# Idempotent: a second run installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (sudo $0)" >&2
  exit 1
fi

# One list for the whole project; each line says who needs it.
APT_PACKAGES=(
  python3 python3-venv python3-pip python3-dev   # the venv (system Python, for bcc)
  python3-bpfcc bpfcc-tools bpftool              # XDP data plane (bcc from Debian, never PyPI's "bcc")
  iproute2 nftables iputils-ping procps psmisc   # namespaces, NAT, lab tooling
  tshark tcpdump                                 # bench: pyshark baseline; replay tests: real captures
  make gcc
  python3-tk xvfb xauth chromium chromium-driver xdotool ffmpeg  # user agent: pyautogui, headful Chromium, test clip
  openvpn openssl vagrant vagrant-libvirt shellcheck  # lab: tunnel, certificate checks, VM pair validation
  systemd                                        # tests: systemd-analyze verify / systemd-escape on the unit
  prometheus                                     # tests: a real Prometheus scrapes the agent and iqn-qos serve; promtool
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Kernels without their own
# headers get Debian's generic ones, linked in; only when the build dir is missing.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
  echo "setup: no kernel headers at $kdir/build; using Debian's linux-headers-amd64"
  if ! ls -d /usr/src/linux-headers-*-amd64 >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64
  fi
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  echo "setup: linked $kdir/build -> $hdr and $kdir/source -> $common"
fi

# The venv sees Debian's bcc through --system-site-packages.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
  echo "setup: creating .venv (with system site packages, for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: installing the project and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[all]'
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/iqn-ctl)"
