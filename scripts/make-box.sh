#!/usr/bin/env bash
# Build the local Vagrant box (libvirt provider) from Debian's packages only, so
# `vagrant up` needs no box download and provisioning needs no download either.
#   bash scripts/make-box.sh            # build if the recipe changed, then print the box's directory
#   bash scripts/make-box.sh --add      # also `vagrant box add --force` it (for `cd vagrant && vagrant up`)
#   bash scripts/make-box.sh --print-key  # the recipe's key (no root, builds nothing)
#
# The recipe is this script plus vagrant/box/packages.txt (Debian packages) and
# vagrant/box/requirements.txt (wheels for /opt/iqn/venv); its hash names the
# box, so an unchanged recipe reuses the cached box in $IQN_BOX_CACHE
# (default /var/cache/iqn) and a changed one builds a new one.
#
# What is in it: Debian 12 (debootstrap), the `vagrant` user with Vagrant's
# insecure key and password-less sudo, systemd-networkd (DHCP on eth0), both
# roles' packages (vagrant/box/packages.txt), and a venv with the project's
# Python dependencies. No boot loader: the VMs boot the box's kernel and initrd
# directly (libvirt direct kernel boot; the box's own Vagrantfile points at
# them), with a small initrd (virtio and ext4 only), which matters under TCG.
set -euo pipefail
cd "$(dirname "$0")/.."
RECIPE=(scripts/make-box.sh vagrant/box/packages.txt vagrant/box/requirements.txt)
CACHE=${IQN_BOX_CACHE:-/var/cache/iqn}
MIRROR=${IQN_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
SIZE=${IQN_BOX_SIZE:-4G}
key=$(cat "${RECIPE[@]}" | sha256sum | cut -c1-12)
name="iqn-bookworm-$key"
out="$CACHE/box-$key"

add=0
case "${1:-}" in
  --print-key) echo "$key"; exit 0 ;;
  --add) add=1 ;;
  "") ;;
  *) echo "make-box: unknown argument $1 (use --add or --print-key)" >&2; exit 2 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
  echo "make-box: run as root (debootstrap and chroot)" >&2
  exit 1
fi
for tool in debootstrap mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || { echo "make-box: $tool not found: run bash scripts/setup.sh" >&2; exit 1; }
done
mkdir -p "$CACHE"
exec 9>"$CACHE/box.lock"
flock 9 # one build at a time; a second caller waits and then finds the box

packages() { sed -e 's/#.*//' vagrant/box/packages.txt | tr -s ' \t' '\n' | sed '/^$/d'; }

build() {
  local work root wheels t0
  t0=$(date +%s)
  work=$(mktemp -d "$CACHE/.build-$key.XXXXXX")
  root="$work/root"
  # shellcheck disable=SC2064 # expand now: the trap must clean this build's own dirs
  trap "umount -R '$root/proc' '$root/sys' '$root/dev' 2>/dev/null || true; rm -rf '$work'" EXIT
  echo "make-box: debootstrap $SUITE into $root"
  debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 20 "$work/debootstrap.log" >&2; return 1; }
  cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb ${MIRROR%/debian}/debian-security $SUITE-security main
EOF
  # no docs, man pages or translations; no daemons started inside the chroot
  cat >"$root/etc/dpkg/dpkg.cfg.d/01-iqn-nodoc" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/locale/*
path-exclude=/usr/share/info/*
EOF
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 0755 "$root/usr/sbin/policy-rc.d"
  # a small initrd: the VMs have virtio disks and NICs and an ext4 root, nothing else
  mkdir -p "$root/etc/initramfs-tools/conf.d"
  echo "MODULES=list" >"$root/etc/initramfs-tools/conf.d/iqn.conf"
  printf '%s\n' virtio_pci virtio_blk virtio_net ext4 >>"$root/etc/initramfs-tools/modules"
  mount -t proc proc "$root/proc"
  mount -t sysfs sys "$root/sys"
  # a private /dev with the few nodes package scripts use, not the host's bound in: systemd's
  # postinst applies its tmpfiles to /dev in the chroot (static-nodes-permissions.conf: "z
  # /dev/kvm 0666 - kvm"), with the *chroot's* gid of kvm, which on the host is another
  # group (ssl-cert here): libvirt's qemu user then cannot open the host's /dev/kvm and
  # libvirt probes QEMU again on every call (a CI run's `vagrant up` ran out of time so)
  mount -t tmpfs -o mode=0755,nosuid dev "$root/dev"
  local node
  for node in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
    IFS=: read -r n ma mi <<<"$node"
    mknod -m 0666 "$root/dev/$n" c "$ma" "$mi"
  done
  mkdir -m 0755 "$root/dev/pts"
  mkdir -m 1777 "$root/dev/shm"
  ln -s /proc/self/fd "$root/dev/fd"
  ln -s /proc/self/fd/0 "$root/dev/stdin"
  ln -s /proc/self/fd/1 "$root/dev/stdout"
  ln -s /proc/self/fd/2 "$root/dev/stderr"
  echo "make-box: apt-get install $(packages | wc -l) packages"
  chroot "$root" apt-get update -q >"$work/apt.log" 2>&1
  # shellcheck disable=SC2046 # one package a word
  DEBIAN_FRONTEND=noninteractive chroot "$root" apt-get install -y -q --no-install-recommends \
    $(packages) >>"$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; return 1; }
  # shellcheck disable=SC2016 # dpkg-query's own format, not the shell's
  chroot "$root" dpkg-query -W -f='${Package} ${Version}\n' >"$work/dpkg.txt"
  # drivers a VM never needs (graphics, sound, wireless, USB, storage controllers...): a
  # third of the image, uploaded to libvirt at every `vagrant up`
  local kver
  kver=$(basename "$(ls -d "$root"/lib/modules/*)")
  (cd "$root/lib/modules/$kver/kernel" &&
    rm -rf sound net/wireless net/mac80211 net/bluetooth \
      drivers/{gpu,media,infiniband,staging,bluetooth,iio,scsi,usb,hid,input,isdn,mtd,thunderbolt} \
      drivers/{net/wireless,net/ethernet,net/can,net/usb,ata,mmc,nvme,md,fpga,hwmon,edac,leds,firewire})
  chroot "$root" depmod -a "$kver"

  echo "make-box: Python packages into /opt/iqn/venv"
  wheels="$root/tmp/wheels"
  mkdir -p "$wheels"
  python3 -m pip download -q --only-binary=:all: --python-version 3.11 --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --implementation cp \
    -d "$wheels" -r vagrant/box/requirements.txt
  chroot "$root" python3 -m venv --system-site-packages /opt/iqn/venv
  chroot "$root" /opt/iqn/venv/bin/pip install -q --no-index --find-links /tmp/wheels \
    -r /dev/stdin <vagrant/box/requirements.txt
  chroot "$root" /opt/iqn/venv/bin/pip freeze >"$work/pip.txt"
  rm -rf "$wheels"

  echo "make-box: vagrant user, ssh, network, console"
  chroot "$root" useradd -m -s /bin/bash vagrant
  echo vagrant:vagrant | chroot "$root" chpasswd
  echo "vagrant ALL=(ALL) NOPASSWD: ALL" >"$root/etc/sudoers.d/vagrant"
  chmod 0440 "$root/etc/sudoers.d/vagrant"
  install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
  local insecure
  insecure=$(find /usr/share/rubygems-integration /usr/lib/ruby -path '*/keys/vagrant.pub' 2>/dev/null | head -n 1)
  [ -n "$insecure" ] || { echo "make-box: Vagrant's insecure key not found (install vagrant)" >&2; return 1; }
  install -m 0600 -o 1000 -g 1000 "$insecure" "$root/home/vagrant/.ssh/authorized_keys"
  # each VM its own host key, made at its first boot: keys baked into the image would be
  # shared by every VM of the box (one ed25519 key: RSA key generation is slow under TCG)
  printf 'UseDNS no\nHostKey /etc/ssh/ssh_host_ed25519_key\n' >"$root/etc/ssh/sshd_config.d/iqn.conf"
  rm -f "$root"/etc/ssh/ssh_host_*
  install -d "$root/etc/systemd/system/ssh.service.d"
  cat >"$root/etc/systemd/system/ssh.service.d/iqn-hostkey.conf" <<'EOF'
[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -e /etc/ssh/ssh_host_ed25519_key || ssh-keygen -q -t ed25519 -N "" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
EOF
  cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0
[Network]
DHCP=ipv4
[DHCPv4]
ClientIdentifier=mac
EOF
  chroot "$root" systemctl enable systemd-networkd ssh serial-getty@ttyS0 >/dev/null 2>&1
  # no periodic jobs in a VM that lives for minutes (and runs emulated)
  chroot "$root" systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
    dpkg-db-backup.timer systemd-networkd-wait-online.service >/dev/null 2>&1
  echo "/dev/vda / ext4 defaults,noatime 0 1" >"$root/etc/fstab"
  echo iqn-box >"$root/etc/hostname"
  : >"$root/etc/machine-id" # each VM makes its own (and so its own DHCP identity)
  rm -f "$root/var/lib/dbus/machine-id" "$root/usr/sbin/policy-rc.d"
  cp "$work/dpkg.txt" "$root/etc/iqn-box.dpkg"
  printf 'key=%s\nbuilt=%s\n' "$key" "$(date -u +%FT%TZ)" >"$root/etc/iqn-box"
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/*
  umount -R "$root/proc" "$root/sys" "$root/dev"

  echo "make-box: image"
  mkdir -p "$work/box"
  cp "$root/boot/vmlinuz-$kver" "$work/box/vmlinuz"
  cp "$root/boot/initrd.img-$kver" "$work/box/initrd.img"
  truncate -s "$SIZE" "$work/root.img"
  mkfs.ext4 -q -L root -d "$root" "$work/root.img"
  qemu-img convert -O qcow2 "$work/root.img" "$work/box/box.img"
  rm -f "$work/root.img"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "${SIZE%G}" >"$work/box/metadata.json"
  cat >"$work/box/Vagrantfile" <<'EOF'
# The IQN local box (scripts/make-box.sh): no boot loader, the VM boots the
# box's own kernel and initrd (libvirt direct kernel boot).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    lv.kernel = File.join(__dir__, "vmlinuz")
    lv.initrd = File.join(__dir__, "initrd.img")
    lv.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0 mitigations=off quiet"
    lv.disk_bus = "virtio"
  end
end
EOF
  cp "$work/dpkg.txt" "$work/box/dpkg.txt"
  cp "$work/pip.txt" "$work/box/pip.txt"
  printf '%s\n' "$kver" >"$work/box/kernel.txt"
  (cd "$work/box" && tar cf "$name.box" metadata.json Vagrantfile box.img vmlinuz initrd.img)
  rm -rf "$out"
  mv "$work/box" "$out"
  echo "make-box: built $out in $(($(date +%s) - t0)) s"
}

if [ ! -e "$out/$name.box" ]; then
  build
  # drop older builds of other recipes: a box is ~1 GB
  find "$CACHE" -maxdepth 1 -name 'box-*' -type d ! -name "box-$key" -exec rm -rf {} +
fi
if [ "$add" -eq 1 ]; then
  vagrant box add --force --name "$name" "$out/$name.box" >&2
  echo "make-box: accelerator $(bash scripts/vm-accel.sh "$out")" >&2
fi
echo "$out"
