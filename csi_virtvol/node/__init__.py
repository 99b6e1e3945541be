"""The node data path: extents of LUNs -> one block device -> a filesystem.

Modules, bottom up:
  commands  the one subprocess wrapper (errors -> errors.BackendError)
  layout    BackingExtent and the concatenation table shared with the daemon
  devices   loop devices through losetup
  concatfs  the userspace concatenation daemon (FUSE), run as its own process
  concat    starts, reloads and stops that daemon; a loop device on its file
  dm        device-mapper linear composition (where /dev/mapper/control exists)
  dmioctl   the device-mapper ioctls a cut makes in-process (suspend, resume, status)
  dmcut     live cuts and change tracking on dm: dm-snapshot and dm-era under the volume
  fs        blkid, mkfs, mount, bind, grow, stats, mount group, health
  stager    Stager: stage/unstage/expand/publish/unpublish/stats/condition
Nothing here imports grpc.
"""
