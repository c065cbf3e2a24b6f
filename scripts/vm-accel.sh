#!/usr/bin/env bash
# Which accelerator the VM pair can use here: boot the local box's kernel once
# under KVM and see whether it starts (prints its banner on the serial console).
# On some hosts (nested virtualisation) /dev/kvm exists but a stock kernel hangs
# right after the firmware; there the VMs need TCG (software emulation).
#   bash scripts/vm-accel.sh BOX_DIR      # prints kvm or tcg, and records it in $IQN_BOX_CACHE/accel
# The Vagrantfile reads that record (IQN_VAGRANT_ACCEL overrides it).
set -euo pipefail
box=${1:?usage: vm-accel.sh BOX_DIR (the directory make-box.sh printed)}
cache=${IQN_BOX_CACHE:-/var/cache/iqn}
wait_s=${IQN_ACCEL_PROBE_S:-30}
# measured once per box (the record is newer than the box's kernel); IQN_ACCEL_PROBE=1 measures again
if [ "${IQN_ACCEL_PROBE:-0}" != 1 ] && [ "$cache/accel" -nt "$box/vmlinuz" ] &&
  grep -qxE 'kvm|tcg' "$cache/accel"; then
  cat "$cache/accel"
  exit 0
fi
accel=tcg
if [ -r /dev/kvm ] && [ -w /dev/kvm ] && command -v qemu-system-x86_64 >/dev/null; then
  log=$(mktemp)
  # no disk: the kernel panics (and, with -no-reboot, QEMU exits) once it looks for its root
  timeout "$wait_s" qemu-system-x86_64 -accel kvm -m 256 -display none -serial "file:$log" -no-reboot \
    -kernel "$box/vmlinuz" -initrd "$box/initrd.img" \
    -append "console=ttyS0 panic=-1 root=/dev/nonexistent rootdelay=0" >/dev/null 2>&1 || true
  grep -q "Linux version" "$log" && accel=kvm
  rm -f "$log"
fi
mkdir -p "$cache"
echo "$accel" >"$cache/accel.tmp" && mv "$cache/accel.tmp" "$cache/accel"
echo "$accel"
