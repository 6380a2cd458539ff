#!/bin/sh
# Stage 2 in the guest, PID 1 after switch_root into the host's root (read-only over 9p).
# Loads the modules the kernel tier needs, runs the command the host runner wrote into the
# run directory, records its exit status there, syncs and powers off.
# `guest.sh RUN systemd`: run by iosm-vm-test.service under systemd as PID 1 instead; systemd
# has brought lo up and powers off when this script ends (SuccessAction/FailureAction).
RUN=$1
MODE=${2:-pid1}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp/home
mkdir -p "$HOME"
. "$RUN/env"
[ "$MODE" = systemd ] || ip link set lo up 2>/dev/null || busybox ip link set lo up
for m in cuse tun uio uio_pci_generic; do
    modprobe "$m" || echo "iosm-vm: modprobe $m failed"
done
cd "$IOSM_VM_WORK" || echo "iosm-vm: no work tree $IOSM_VM_WORK"
# Through a pipe, not the serial tty: pytest then prints a log, not live progress redraws.
mkfifo /tmp/iosm-vm-out
cat /tmp/iosm-vm-out &
# The guest's uptime when the command starts and ends: the runner reports boot and test times.
cut -d' ' -f1 /proc/uptime > "$RUN/uptime-start"
sh "$RUN/cmd" </dev/null >/tmp/iosm-vm-out 2>&1
status=$?
wait
cut -d' ' -f1 /proc/uptime > "$RUN/uptime-end"
echo $status > "$RUN/status.tmp" && mv "$RUN/status.tmp" "$RUN/status"
sync
[ "$MODE" = systemd ] && exit 0
busybox poweroff -f
echo o > /proc/sysrq-trigger
