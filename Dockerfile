# The csi-virtvol image: controller, node plugin and copy Jobs all run it.
#   docker build -t csi-virtvol:0.1.0 .
# ENTRYPOINT is the csi-virtvol CLI: the chart passes `serve ...`, copy Jobs `copy ...`.
FROM python:3.11-slim

# Node tools: filesystems, loop/mount (util-linux), FUSE, NBD (nbdkit with its
# Python plugin, nbdfuse, nbd-client), qemu-img and qemu-storage-daemon, LVM and
# device-mapper, iSCSI initiator, modprobe and udev for device nodes.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      e2fsprogs xfsprogs btrfs-progs util-linux mount \
      fuse3 libfuse3-3 \
      nbdkit nbdkit-plugin-python nbdfuse libnbd-bin nbd-client \
      qemu-utils qemu-system-common \
      lvm2 thin-provisioning-tools dmsetup \
      open-iscsi sg3-utils \
      kmod udev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY csi_virtvol ./csi_virtvol
# grpcio-tools (a build requirement) generates the CSI stubs during the build.
RUN pip install --no-cache-dir ".[kubernetes]" \
 && rm -rf /src /root/.cache \
 && csi-virtvol --help >/dev/null

WORKDIR /
ENTRYPOINT ["csi-virtvol"]
CMD ["--help"]
