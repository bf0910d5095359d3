#!/usr/bin/env bash
# The README's on-prem path, run end to end on this machine: `ray up` of cluster-local.yaml (head 127.0.0.1, reached
# over SSH), the smoke search on it with `ray exec`, an evaluation of its best checkpoint, `ray down`.
#
# tests/test_ray_up.py runs this inside `unshare --net --pid --fork --mount-proc`, as root, and prepares $T (keys,
# sshd_config, the SSH user's home, the filled-in config). The namespaces are what make it safe on a shared host:
#   - PID: the launcher's `ray stop`s (start commands, `ray down`) end every Ray process they can see, and they see
#     only this namespace's; when this script ends, the kernel ends whatever is left in it;
#   - network: a loopback of its own, so sshd takes port 22 and Ray its default ports without meeting anyone's;
#   - mounts (private): Ray's temp folder /tmp/ray (sessions, the local provider's state) and the config's shared
#     storage /mnt/shared are folders of $T here and nowhere else.
# Each step prints "+ command" and "= N s" (its wall time).
set -euo pipefail
: "${T:?}" "${REPO:?}" "${PYBIN:?}" "${CONFIG:?}" "${EXP:?}"

ip link set lo up
mkdir -p /tmp/ray /run/sshd
mount --bind "$T/raytmp" /tmp/ray
mount -t tmpfs tmpfs /mnt && mkdir /mnt/shared && mount --bind "$T/shared" /mnt/shared
/usr/sbin/sshd -f "$T/ssh/sshd_config" -E "$T/ssh/sshd.log"

step() {
    echo "+ $*"
    local start=$SECONDS
    "$@"
    printf '\n= %d s\n' $((SECONDS - start))  # on a line of its own: a command may end without a newline
}

# The client: your machine, with the cluster's token made as the README says, running from the repository root.
cd "$REPO"
export HOME="$T/client" TMPDIR="$T/client/tmp" PATH="$PYBIN:$PATH"
step ray get-auth-token --generate
step ray up -y "$CONFIG"
step ray exec "$CONFIG" "cd ~/cube_ray && python -m cube_ray.tune --space smoke --address auto --name $EXP \
--out /mnt/shared/cube_ray/results --limit 300 --num-samples 2 --keep-checkpoints 1 --seed 0"
step ray exec "$CONFIG" "cd ~/cube_ray && python -m cube_ray.evaluate --json \
\$(cat /mnt/shared/cube_ray/results/$EXP/best_checkpoint) > /mnt/shared/cube_ray/results/$EXP/evaluate.json"
step ray down -y "$CONFIG"
# `ray down` stopped the head's Ray: no raylet or GCS server is left (pgrep sees this PID namespace only)
if pgrep -a 'raylet|gcs_server'; then echo "Ray still runs after ray down" >&2; exit 1; fi
kill "$(cat "$T/ssh/sshd.pid")"
