#!/usr/bin/env bash
# Install what IQN needs on a fresh Debian/Ubuntu box (run as root):
# Debian packages, kernel headers for bcc, and a venv in .venv with the project.
#   bash scripts/setup.sh [--role router|user|lab|all]   (default: all, the development and CI box)
#   bash scripts/setup.sh --role router --print-packages  (the role's apt packages and pip extra; no root)
# A role installs only its own Debian packages and the matching pip extra (pyproject.toml).
# Idempotent: a second run installs nothing that is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

role=all
print_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --role) role="${2:-}"; shift 2 || { echo "setup: --role needs a value" >&2; exit 2; } ;;
    --role=*) role="${1#--role=}"; shift ;;
    --print-packages) print_only=1; shift ;;
    *) echo "setup: unknown argument $1 (use --role router|user|lab|all, --print-packages)" >&2; exit 2 ;;
  esac
done

# Debian packages per role; each line says who needs it.
BASE=(python3 python3-venv python3-pip python3-dev iproute2 procps)  # the venv (system Python, for bcc)
ROUTER=(
  python3-bpfcc bpfcc-tools bpftool              # XDP data plane (bcc from Debian, never PyPI's "bcc")
  systemd                                        # the unit (packaging/systemd), systemd-escape
)
USER_PKGS=(
  python3-tk xvfb xauth chromium chromium-driver xdotool ffmpeg  # user agent: pyautogui, headful Chromium, test clip
)
LAB=(
  nftables iputils-ping psmisc tcpdump           # namespaces, NAT, lab tooling, captures
  openvpn openssl                                # lab: tunnel, certificate checks
)
VMS=(
  vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base  # the VM pair (vagrant/)
  qemu-system-x86 qemu-utils debootstrap         # its VMs (TCG where KVM fails) and local box (make-box.sh)
)
DEV=(
  tshark make gcc                                # bench: pyshark baseline
  shellcheck                                     # lab: VM pair script checks
  prometheus                                     # tests: promtool, a real Prometheus scraping the agent and iqn-qos serve
)

case "$role" in
  router) APT_PACKAGES=("${BASE[@]}" "${ROUTER[@]}"); extra=router ;;
  user) APT_PACKAGES=("${BASE[@]}" "${USER_PKGS[@]}"); extra=user ;;
  lab) APT_PACKAGES=("${BASE[@]}" "${ROUTER[@]}" "${USER_PKGS[@]}" "${LAB[@]}" "${VMS[@]}"); extra=lab ;;
  all) APT_PACKAGES=("${BASE[@]}" "${ROUTER[@]}" "${USER_PKGS[@]}" "${LAB[@]}" "${VMS[@]}" "${DEV[@]}"); extra=all ;;
  *) echo "setup: unknown role '$role' (router|user|lab|all)" >&2; exit 2 ;;
esac

if [ "$print_only" -eq 1 ]; then
  echo "apt: ${APT_PACKAGES[*]}"
  echo "pip: .[$extra]"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (sudo $0)" >&2
  exit 1
fi

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

# The VM pair's libvirtd, and virtlogd (it keeps the VMs' console logs; without it no
# VM starts): started here where no init system starts them (containers, CI).
if [ "$role" = lab ] || [ "$role" = all ]; then
  # true when a daemon accepts connections on unix socket $1
  answers() { python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null; }
  if [ -d /run/systemd/system ]; then
    virsh -c qemu:///system uri >/dev/null 2>&1 || systemctl start libvirtd virtlogd
  else
    # A socket file is not a daemon: a machine restored from an image keeps /run/libvirt's
    # sockets with nothing behind them (CI failed on "virtlogd-sock: Connection refused").
    if ! answers /run/libvirt/virtlogd-sock; then
      echo "setup: starting virtlogd"
      virtlogd -d
      for _ in $(seq 50); do answers /run/libvirt/virtlogd-sock && break; sleep 0.2; done
      answers /run/libvirt/virtlogd-sock || { echo "setup: virtlogd did not start" >&2; exit 1; }
    fi
    if ! virsh -c qemu:///system uri >/dev/null 2>&1; then
      echo "setup: starting libvirtd"
      libvirtd -d
      for _ in $(seq 50); do virsh -c qemu:///system uri >/dev/null 2>&1 && break; sleep 0.2; done
    fi
  fi
  virsh -c qemu:///system uri >/dev/null || { echo "setup: libvirtd did not start" >&2; exit 1; }
  # /dev/kvm for the kvm group, as Debian's udev rule has it. Where no udev ran (containers,
  # CI) it can keep a foreign group (a box build before scripts/make-box.sh's private /dev
  # set it to the chroot's kvm gid): libvirt's qemu user then cannot open it while libvirt's
  # QEMU probe (run with CAP_DAC_OVERRIDE) can, so libvirt finds its capabilities stale on
  # every call and probes QEMU again, ~4 s each: `vagrant up` spent 4-5 minutes on it here.
  if [ -c /dev/kvm ] && getent group kvm >/dev/null && [ "$(stat -c %G /dev/kvm)" != kvm ]; then
    echo "setup: /dev/kvm belongs to group $(stat -c %G /dev/kvm); giving it to kvm (libvirt)"
    chgrp kvm /dev/kvm
  fi
fi

# bcc compiles against /lib/modules/$(uname -r)/build. Kernels without their own
# headers get Debian's generic ones, linked in; only when the build dir is missing.
kdir="/lib/modules/$(uname -r)"
if [ "$role" != user ] && [ ! -e "$kdir/build/include" ]; then
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
if [ ! -x .venv/bin/python ] || { [ "$role" != user ] && ! .venv/bin/python -c 'import bcc' 2>/dev/null; }; then
  echo "setup: creating .venv (with system site packages, for bcc)"
  rm -rf .venv
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.installed-$extra-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
  echo "setup: installing the project and its Python dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extra]"
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/iqn-ctl)"
