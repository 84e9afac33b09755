#!/bin/bash
# Boots systemd as PID 1 of the new PID namespace `unshare` made, kept private (docs/deployment.md,
# "The test bed"): tmpfs on /run, /tmp, /var/tmp and /home, overlays on /etc, /var/lib and
# /usr/local whose upper layers live in that tmpfs, and the sysinit units that would act on the
# host (tmpfiles empties /tmp, sysctl, udev, utmp, …) masked. Nothing it does reaches the host:
# the namespace and its mounts go when systemd exits.
# Usage: unshare --pid --fork --mount --mount-proc --propagation private boot.sh REPO
set -euo pipefail
repo=$1
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/armory-test/src /run/armory-test/layers
# The project stays reachable at its own path, also when it lives under /tmp.
mount --bind "$repo" /run/armory-test/src
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /var/tmp
mount -t tmpfs -o mode=0755 tmpfs /home
mkdir -p "$repo"
mount --bind /run/armory-test/src "$repo"
for dir in etc var/lib usr/local; do
  mkdir -p "/run/armory-test/layers/$dir/upper" "/run/armory-test/layers/$dir/work"
  mount -t overlay overlay -o "lowerdir=/$dir,upperdir=/run/armory-test/layers/$dir/upper,workdir=/run/armory-test/layers/$dir/work" "/$dir"
done
mkdir -p /run/systemd/system
for unit in systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-setup-dev-early.service \
    systemd-tmpfiles-clean.timer systemd-tmpfiles-clean.service systemd-remount-fs.service systemd-sysctl.service \
    systemd-update-utmp.service systemd-update-utmp-runlevel.service systemd-modules-load.service systemd-timesyncd.service \
    systemd-pstore.service systemd-udevd.service systemd-udev-trigger.service systemd-udev-settle.service getty.target \
    apt-daily.timer apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer dpkg-db-backup.timer \
    postgresql.service systemd-journal-flush.service systemd-random-seed.service systemd-machine-id-commit.service \
    systemd-firstboot.service systemd-hwdb-update.service systemd-binfmt.service; do
  ln -sf /dev/null "/run/systemd/system/$unit"
done
printf '[Unit]\nDescription=armoryd test bed\n' > /run/systemd/system/test.target
exec env -i container=docker PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin /lib/systemd/systemd --system --unit=test.target
