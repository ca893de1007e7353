#!/bin/busybox sh
# /init of the lobster initramfs (busybox ash).
#
# Loads the virtio and overlay modules (Debian builds them as modules, so the kernel
# alone cannot see the disks or the NIC), mounts /dev/vda (shared rootfs, read-only)
# under the tenant's writable /dev/vdb with overlayfs, configures eth0 from
# lobster.ip/lobster.gw (the kernel's ip= cannot be used: virtio_net is a module) and
# switch_roots into /sbin/lobster-init.
#
# Any failure powers the VM off with one clear line on the console: there is no shell
# to drop to, on purpose.
#
# With LOBSTER_INITRAMFS_LIB=1 the file only defines its functions (for tests).

MODULE_DIR=/lib/modules
MODULE_ORDER=/etc/modules-order
MODULE_TMP=/tmp/module.ko   # a decompressed module, just before insmod
WAIT_TENTHS=100   # disks and eth0: at most 10 s each

say() {
    echo "lobster-initramfs: $*" > /dev/kmsg 2>/dev/null || true
    echo "lobster-initramfs: $*" > /dev/console 2>/dev/null || true
}

die() {
    say "FATAL: $*; powering off"
    sync
    poweroff -f
    # poweroff returned (should not happen): never exit PID 1, never give a shell.
    while :; do sleep 60; done
}

nap() {
    usleep 100000 2>/dev/null || sleep 1
}

# parse_cmdline "<text>": sets LOBSTER_IP, LOBSTER_GW, LOBSTER_NAME from lobster.* words.
parse_cmdline() {
    LOBSTER_IP=""
    LOBSTER_GW=""
    LOBSTER_NAME=""
    for word in $1; do
        case "$word" in
            lobster.ip=*) LOBSTER_IP="${word#lobster.ip=}" ;;
            lobster.gw=*) LOBSTER_GW="${word#lobster.gw=}" ;;
            lobster.name=*) LOBSTER_NAME="${word#lobster.name=}" ;;
        esac
    done
}

# valid_cidr "<a.b.c.d/n>": success if it looks like an IPv4 address with a prefix length.
valid_cidr() {
    case "$1" in
        */*) valid_ipv4 "${1%/*}" || return 1
             case "${1#*/}" in ''|*[!0-9]*) return 1 ;; esac
             [ "${1#*/}" -le 32 ] ;;
        *) return 1 ;;
    esac
}

valid_ipv4() {
    case "$1" in ''|*[!0-9.]*|*..*|.*|*.) return 1 ;; esac
    old_ifs="$IFS"; IFS=.
    # shellcheck disable=SC2086
    set -- $1
    IFS="$old_ifs"
    [ "$#" -eq 4 ] || return 1
    for octet in "$@"; do
        [ "$octet" -le 255 ] || return 1
    done
}

# module_file <dir> <entry>: prints the loadable file for an entry of the order file,
# whether the entry is written with or without .ko/.ko.xz/.ko.zst; fails if none exists.
module_file() {
    base="$2"
    base="${base%.zst}"; base="${base%.xz}"; base="${base%.ko}"
    for ext in .ko .ko.xz .ko.zst; do
        if [ -f "$1/$base$ext" ]; then
            echo "$1/$base$ext"
            return 0
        fi
    done
    return 1
}

load_module() {
    file="$1"
    case "$file" in
        *.ko) insmod "$file" ;;
        *.ko.xz) unxz -c "$file" > "$MODULE_TMP" && insmod "$MODULE_TMP" ;;
        *.ko.zst) zstd -dc "$file" > "$MODULE_TMP" && insmod "$MODULE_TMP" ;;
        *) return 1 ;;
    esac
}

load_modules() {
    [ -f "$MODULE_ORDER" ] || { say "no $MODULE_ORDER; assuming built-in drivers"; return 0; }
    while read -r entry; do
        case "$entry" in ''|'#'*) continue ;; esac
        if ! file=$(module_file "$MODULE_DIR" "$entry"); then
            say "module $entry not found in $MODULE_DIR"
            continue
        fi
        # A failure is reported, not fatal: the disk/NIC checks below decide.
        load_module "$file" 2>/dev/null || say "insmod $file failed"
    done < "$MODULE_ORDER"
    rm -f "$MODULE_TMP"
}

# is_mounted <dir>: busybox here has no `mountpoint` applet; /proc/mounts may not exist yet.
is_mounted() {
    grep -qs " $1 " /proc/mounts
}

wait_for() {
    i=0
    while [ ! -e "$1" ]; do
        i=$((i + 1))
        [ "$i" -le "$WAIT_TENTHS" ] || return 1
        nap
    done
}

main() {
    /bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp
    /bin/busybox --install -s /bin 2>/dev/null
    export PATH=/bin:/sbin:/usr/bin:/usr/sbin

    is_mounted /proc || mount -t proc -o nosuid,nodev,noexec proc /proc \
        || die "cannot mount /proc"
    is_mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys \
        || die "cannot mount /sys"
    is_mounted /dev || mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev \
        || die "cannot mount /dev"

    parse_cmdline "$(cat /proc/cmdline)"
    valid_cidr "$LOBSTER_IP" || die "lobster.ip missing or malformed on the kernel command line"
    valid_ipv4 "$LOBSTER_GW" || die "lobster.gw missing or malformed on the kernel command line"

    load_modules
    say "modules loaded"

    wait_for /dev/vda || die "root disk /dev/vda did not appear"
    wait_for /dev/vdb || die "overlay disk /dev/vdb did not appear"

    mkdir -p /lower /overlay /newroot
    mount -t ext4 -o ro /dev/vda /lower || die "cannot mount /dev/vda read-only"
    mount -t ext4 -o noatime /dev/vdb /overlay || die "cannot mount /dev/vdb (overlay disk)"
    mkdir -p /overlay/upper /overlay/work || die "cannot create overlay directories"
    mount -t overlay overlay \
        -o lowerdir=/lower,upperdir=/overlay/upper,workdir=/overlay/work /newroot \
        || die "cannot mount the overlay root"
    [ -x /newroot/sbin/lobster-init ] || die "/sbin/lobster-init missing from the root image"

    wait_for /sys/class/net/eth0 || die "eth0 did not appear"
    ip link set lo up
    ip link set eth0 up || die "cannot bring eth0 up"
    ip addr add "$LOBSTER_IP" dev eth0 || die "cannot add $LOBSTER_IP to eth0"
    ip route add default via "$LOBSTER_GW" dev eth0 || die "cannot add the default route"

    say "root and eth0 ready; starting /sbin/lobster-init"
    for fs in dev proc sys; do
        mkdir -p "/newroot/$fs"
        mount --move "/$fs" "/newroot/$fs" || die "cannot move /$fs into the new root"
    done

    exec switch_root /newroot /sbin/lobster-init
    # Only reached if exec failed; /dev is already moved, so use the new root's console.
    echo "lobster-initramfs: FATAL: switch_root failed; powering off" > /newroot/dev/kmsg
    poweroff -f
    while :; do sleep 60; done
}

if [ "${LOBSTER_INITRAMFS_LIB:-}" != 1 ]; then
    if [ "$$" != 1 ]; then
        echo "lobster-initramfs: refusing to run: not PID 1" >&2
        exit 2
    fi
    main
fi
