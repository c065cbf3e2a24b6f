#!/usr/bin/env bash
# Build the router's Debian package with dpkg-deb (no debhelper needed):
#   bash packaging/debian/build.sh [OUTDIR]   -> OUTDIR/iqn-router_<version>_<arch>.deb
# It holds a venv with iqn[router] under /opt/iqn (numpy and matplotlib carry
# compiled code, so the package is of the build machine's architecture, not "all"),
# the systemd unit, a default drop-in (the one file to edit) and maintainer
# scripts that add the `iqn` user and take away what they added.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)
out=$(realpath -m "${1:-$top/dist}")
version=$(/usr/bin/python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$top/pyproject.toml")
arch=$(dpkg --print-architecture)
stage=$(mktemp -d /tmp/iqn-deb-XXXXXX)
trap 'rm -rf "$stage"' EXIT
root="$stage/iqn-router"
mkdir -p "$root/DEBIAN" "$root/opt/iqn/docs" "$root/lib/systemd/system" "$root/etc/systemd/system/iqn-ctl@.service.d" "$root/etc/iqn" "$out"

# the project from a clean copy (no .venv, no data) as a wheel, then a venv at its final path
src="$stage/src"
mkdir "$src"
tar -C "$top" --exclude=.venv --exclude=.git --exclude=data --exclude=results --exclude=dist \
  --exclude='*.egg-info' --exclude=__pycache__ -cf - . | tar -C "$src" -xf -
/usr/bin/python3 -m pip wheel -q --no-deps --no-build-isolation -w "$stage/wheel" "$src"
venv="$root/opt/iqn/.venv"
/usr/bin/python3 -m venv --system-site-packages "$venv"   # system site packages: Debian's bcc
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-compile "$(ls "$stage"/wheel/iqn-*.whl)[router]"
# the venv was made under the staging dir: point its scripts at /opt/iqn
grep -rlF "$root" "$venv" | xargs -r sed -i "s|$root||g"
find "$venv" -name __pycache__ -prune -exec rm -rf {} +

install -m 0644 "$top/packaging/systemd/iqn-ctl@.service" "$root/lib/systemd/system/"
install -m 0644 "$top/packaging/systemd/iqn-ctl.service" "$root/lib/systemd/system/"
mkdir -p "$root/usr/bin"
ln -s /opt/iqn/.venv/bin/iqn-ctl "$root/usr/bin/iqn-ctl"   # operators in group iqn run it as themselves
install -m 0644 "$here/iqn.conf" "$root/etc/systemd/system/iqn-ctl@.service.d/iqn.conf"
# the one file to edit for iqn-ctl.service (every interface in one process)
install -m 0644 "$top/packaging/iqn.toml" "$root/etc/iqn/iqn.toml"
install -m 0644 "$top/docs/agent.md" "$top/docs/deploy.md" "$root/opt/iqn/docs/"
for f in postinst prerm postrm; do install -m 0755 "$here/$f" "$root/DEBIAN/"; done
printf '%s\n' /etc/systemd/system/iqn-ctl@.service.d/iqn.conf /etc/iqn/iqn.toml > "$root/DEBIAN/conffiles"
size=$(du -sk "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<CTRL
Package: iqn-router
Version: $version
Architecture: $arch
Maintainer: IQN developers <iqn@localhost>
Installed-Size: $size
Depends: python3 (>= 3.11), python3-bpfcc, iproute2, passwd
Recommends: bpftool, systemd
Section: net
Priority: optional
Description: IQN in-band stall notification agent for routers
 The XDP agent (iqn-ctl attach) with its systemd units (iqn-ctl: every interface
 of /etc/iqn/iqn.toml in one process; iqn-ctl@IFACE: one interface), run as
 the iqn user with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON only.
CTRL
deb="$out/iqn-router_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
