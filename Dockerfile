# The csi-virtvol image: controller, node plugin and copy Jobs all run it.
#   docker build -t csi-virtvol:0.1.0 .
# ENTRYPOINT is the csi-virtvol CLI: the chart passes `serve ...`, copy Jobs `copy ...`.
# Debian 12 (bookworm), like the development machine: the package names below
# are the ones `apt-cache show` checks there (tests/k8s_packaging).
FROM python:3.11-slim-bookworm

# The programs the driver runs (tests/k8s_packaging/test_k8s_image.py maps each
# one to its package):
#   filesystems      mkfs/fsck/grow/freeze: e2fsprogs xfsprogs btrfs-progs util-linux
#   loop, mount      losetup, blkdiscard, blkid, mount: util-linux mount
#   FUSE             fusermount3: fuse3 libfuse3-3
#   NBD              nbd-client (kernel nbd), nbdfuse nbdinfo nbdcopy (libnbd-bin; Debian's
#                    "nbdfuse" is a name libnbd-bin provides), nbdkit with its Python plugin
#   qsd arrays       qemu-storage-daemon (qemu-system-common), qemu-img (qemu-utils)
#   lvm arrays       lvm2, thin-provisioning-tools (thin_check for thin pools), dmsetup
#   dm live cuts     dmsetup; era_invalidate (thin-provisioning-tools) reads dm-era's tracking
#   lio arrays       iscsiadm (open-iscsi: talks to the *host's* iscsid), sg_inq sg_xcopy
#                    (sg3-utils); the target itself is configfs, no tool
#   devices          modprobe (kmod), udevadm (udev)
# The initiator name open-iscsi generates at build time would be the same on
# every node, so it is removed: the pods mount the host's /etc/iscsi (chart
# values node.iscsi.enabled, controller.iscsi.enabled).
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      e2fsprogs xfsprogs btrfs-progs util-linux mount \
      fuse3 libfuse3-3 \
      nbdkit nbdkit-plugin-python nbdfuse libnbd-bin nbd-client \
      qemu-utils qemu-system-common \
      lvm2 thin-provisioning-tools dmsetup \
      open-iscsi sg3-utils \
      kmod udev ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /etc/iscsi/initiatorname.iscsi

WORKDIR /src
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto ./proto
COPY csi_virtvol ./csi_virtvol
# grpcio-tools (a build requirement) generates the CSI stubs into the wheel it builds.
RUN pip install --no-cache-dir ".[kubernetes]" \
 && rm -rf /src /root/.cache

# Smoke check: the installed driver serves CSI. It starts the server on a unix socket with
# a scratch data dir, waits for an Identity Probe to say ready, stops it with SIGTERM and
# needs a clean exit. tests/k8s_packaging/test_k8s_image.py runs this same RUN line
# against a wheel built from a fresh clone.
RUN set -eu; d=$(mktemp -d); \
    csi-virtvol serve --endpoint "unix://$d/csi.sock" --data-dir "$d/data" --node-id smoke-check & server=$!; \
    csi-virtvol identity probe --endpoint "unix://$d/csi.sock" --wait 60 \
      || { kill "$server" 2>/dev/null || true; wait "$server" || true; exit 1; }; \
    kill -TERM "$server"; wait "$server"; \
    rm -rf "$d"

WORKDIR /
ENTRYPOINT ["csi-virtvol"]
CMD ["--help"]
