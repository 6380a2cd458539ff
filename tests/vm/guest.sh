#!/bin/sh
# Stage 2 in the guest, PID 1 after switch_root into the host's root (read-only over 9p).
# Loads the modules the kernel tier needs, runs the command the host runner wrote into the
# run directory, records its exit status there, syncs and powers off.
RUN=$1
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/tmp/home
mkdir -p "$HOME"
. "$RUN/env"
ip link set lo up 2>/dev/null || busybox ip link set lo up
for m in cuse tun uio uio_pci_generic; do
    modprobe "$m" || echo "iosm-vm: modprobe $m failed"
done
cd "$IOSM_VM_WORK" || echo "iosm-vm: no work tree $IOSM_VM_WORK"
# Through a pipe, not the serial tty: pytest then prints a log, not live progress redraws.
mkfifo /tmp/iosm-vm-out
cat /tmp/iosm-vm-out &
sh "$RUN/cmd" </dev/null >/tmp/iosm-vm-out 2>&1
status=$?
wait
echo $status > "$RUN/status.tmp" && mv "$RUN/status.tmp" "$RUN/status"
sync
busybox poweroff -f
echo o > /proc/sysrq-trigger
