#!/bin/sh
# Stage 2 of a vmd test box: runs as PID 1 of the box's new PID namespace, already inside its own
# (private) mount, UTS, IPC and network namespaces, started by `unshare` from mod.rs. It turns
# the host's root into a root filesystem that systemd can boot without changing anything on the
# host, then execs systemd.
#
#   stage2.sh STATE_DIR
#
# Everything host-specific was decided by the harness and written to STATE_DIR/plan/ (see
# state.rs): this script only mounts, creates nodes, copies and execs. Its trace (set -x) goes
# to STATE_DIR/console.log, which the harness shows when this script fails.
set -eux

state=$1
plan=$state/plan
scratch=$state/mnt
new=$scratch/root

# Each plan file holds one entry per line, fields separated by a tab.
tab=$(printf '\t')

# 1. The root: an overlay with the host's / as its read-only lower layer and a tmpfs, private to
#    this mount namespace, as its upper layer. Everything the box writes (tmpfiles' purge of
#    /tmp, useradd, units, apt...) lands in RAM and disappears with the namespace. Without it, a
#    booting systemd empties the host's /tmp (tmpfiles' "D /tmp") among other things.
#    (overlayfs accepts lowerdir=/ although the upper tmpfs is mounted below it.)
mount -t tmpfs -o mode=755,size=2G vmd-box "$scratch"
mkdir -p "$scratch/upper" "$scratch/work" "$new"
mount -t overlay -o "lowerdir=/,upperdir=$scratch/upper,workdir=$scratch/work" vmd-box-root "$new"

# 2. A proc for the new PID namespace, with /proc/sys read-only (as nspawn does).
mount -t proc -o nosuid,nodev,noexec proc "$new/proc"
mount --bind "$new/proc/sys" "$new/proc/sys"
mount -o remount,bind,ro "$new/proc/sys"

# 3. The host's /sys with its top mount read-only: ConditionPathIsReadWrite=/sys then skips
#    udevd, udev-trigger, sysctl and binfmt, which would act on the whole host.
mount --rbind /sys "$new/sys"
mount -o remount,bind,ro,nosuid,nodev,noexec "$new/sys"

# 4. A private tmpfs on /sys/fs/cgroup holding bind mounts of the host's hierarchies, so that
#    systemd's remounts and mkdirs there stay in this namespace. Controllers the host does not
#    mount get read-only placeholder mount points, so systemd neither mounts new global v1
#    hierarchies nor steals controllers from the host's cgroup2.
cgroup=$new/sys/fs/cgroup
mount -t tmpfs -o mode=755,nosuid,nodev,noexec,size=64k vmd-box-cgroup "$cgroup"
while IFS= read -r name; do
    mkdir -p "$cgroup/$name"
    mount --bind "/sys/fs/cgroup/$name" "$cgroup/$name"
done < "$plan/cgroup-binds"
while IFS= read -r name; do
    mkdir -p "$cgroup/$name"
    mount --bind "$cgroup/$name" "$cgroup/$name"
    mount -o remount,bind,ro "$cgroup/$name"
done < "$plan/cgroup-placeholders"
while IFS="$tab" read -r name target; do
    ln -s "$target" "$cgroup/$name"
done < "$plan/cgroup-links"
mount -o remount,ro "$cgroup"

# 5. A private /dev with *fresh* device nodes (same numbers, mode and owner as the host's).
#    Never bind host nodes: they share the inode, and systemd or agetty chown and chmod console
#    nodes (a host /dev/null bound on /dev/console became root:tty 0620 on the host).
mount -t tmpfs -o mode=755,nosuid,size=1M vmd-box-dev "$new/dev"
while IFS="$tab" read -r path mode uid gid major minor; do
    mkdir -p "$(dirname "$new/dev/$path")"
    mknod -m "$mode" "$new/dev/$path" c "$major" "$minor"
    chown "$uid:$gid" "$new/dev/$path"
done < "$plan/devices"
# The console is a private node of the null device: systemd's console output is discarded
# (read the journal instead).
mknod -m 600 "$new/dev/console" c 1 3
mkdir -p "$new/dev/pts" "$new/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620,gid=5 devpts "$new/dev/pts"
ln -s pts/ptmx "$new/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev vmd-box-shm "$new/dev/shm"
ln -s /proc/self/fd "$new/dev/fd"
ln -s /proc/self/fd/0 "$new/dev/stdin"
ln -s /proc/self/fd/1 "$new/dev/stdout"
ln -s /proc/self/fd/2 "$new/dev/stderr"

# 6. An own /run. /run/dbus is a bind mount of STATE_DIR/dbus, so the box's system bus socket is
#    reachable from the host as STATE_DIR/dbus/system_bus_socket, by any uid (the other route,
#    /proc/PID/root/run/dbus/..., needs ptrace rights on the box's PID 1).
mount -t tmpfs -o mode=755,nosuid,nodev,size=20% vmd-box-run "$new/run"
mkdir -p "$new/run/dbus"
mount --bind "$state/dbus" "$new/run/dbus"

# 7. Read-write bind mounts of host paths (cargo's target directory, result directories...).
while IFS="$tab" read -r src dst; do
    if [ -d "$src" ]; then
        mkdir -p "$new$dst"
    else
        mkdir -p "$(dirname "$new$dst")"
        touch "$new$dst"
    fi
    mount --rbind "$src" "$new$dst"
done < "$plan/binds"

# 8. Seed directories, copied onto the new root: the harness's own first (masks, journald,
#    default target, hostname, machine id), then the test's. tar --no-overwrite-dir, unlike
#    cp -a, leaves the mode and owner of existing directories alone (a seed made by mkdtemp is
#    0700, and cp -a would make the box's / 0700 too).
while IFS= read -r seed; do
    tar -C "$seed" -cf - . | tar -C "$new" -xf - --no-overwrite-dir
done < "$plan/seeds"

# 9. Own UTS namespace: set the hostname systemd will find in /etc/hostname anyway.
hostname "$(cat "$new/etc/hostname")"

# 10. Switch to the new root and forget the host's: after this, the host's mounts are not
#     reachable from the box, and when the namespace dies every mount above goes with it.
mkdir "$new/.oldroot"
cd "$new"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot

# 11. systemd as PID 1 in a container (container= tells it so), booting the harness's target
#     (written by state.rs). Its own log goes to the journal once journald runs: the console is
#     the null device (5), and --log-target=console would keep it out of the journal for good.
exec env -i container=vmd-box PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /usr/lib/systemd/systemd --log-target=journal --show-status=no --unit=vmd-box.target
