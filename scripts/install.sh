#!/usr/bin/env bash
# Installs lobsterd and everything it needs on a Debian 12 host. Idempotent.
#   scripts/install.sh          runtime install
#   scripts/install.sh --dev    also the test/lint tools
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LOBSTERD_VENV:-/opt/lobsterd/venv}"
dev=0
[ "${1:-}" = "--dev" ] && dev=1

if [ "$(id -u)" -ne 0 ]; then
  echo "install.sh must run as root (it installs Debian packages)" >&2
  exit 1
fi

packages=(
  python3 python3-venv python3-pip
  qemu-system-x86 qemu-utils
  e2fsprogs util-linux kmod
  debootstrap debian-archive-keyring busybox-static cpio lz4 zstd xz-utils dpkg-dev
  nftables iptables iproute2
  caddy openssh-client ca-certificates
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "==> installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# lobsterd runs and supervises its own Caddy (admin API on a Unix socket only);
# the distribution's service would hold ports 80/443 with an open admin port.
if [ -d /run/systemd/system ] && systemctl is-enabled caddy >/dev/null 2>&1; then
  echo "==> disabling the distribution's caddy.service (lobsterd runs its own)"
  systemctl disable --now caddy || true
fi

python=python3
if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  mkdir -p "$(dirname "$venv")"
  "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null
if [ "$dev" -eq 1 ]; then
  echo "==> installing lobsterd (editable, with test tools) into $venv"
  "$venv/bin/python" -m pip install -q -e "$repo[dev]"
else
  echo "==> installing lobsterd into $venv"
  "$venv/bin/python" -m pip install -q "$repo"
fi
ln -sf "$venv/bin/lobsterd" /usr/local/bin/lobsterd
echo "==> lobsterd $("$venv/bin/lobsterd" --version | awk '{print $NF}') installed: /usr/local/bin/lobsterd"
