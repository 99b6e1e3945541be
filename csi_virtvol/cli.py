"""`csi-virtvol`: the plugin server, a CSI client (like csc), the copy tool, a demo."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from csi_virtvol import errors
from csi_virtvol.config import load_config, parse_size


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise errors.InvalidRequest(f"expected key=value, got {item!r}")
        out[k] = v
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from csi_virtvol import app

    config = load_config(endpoint=args.endpoint, data_dir=args.data_dir, node_id=args.node_id,
                         mode=args.mode, config_file=args.config, store=args.store)
    return app.serve(config)


def cmd_copy(argv: list[str]) -> int:
    from csi_virtvol.copy import cli as copy_cli

    return int(copy_cli.main(argv))


def cmd_volume(args: argparse.Namespace) -> int:
    from csi_virtvol.csi import client as C

    pb = C.pb_
    cl = C.Client(args.endpoint)
    try:
        if args.action == "create":
            out = cl.call(cl.controller.CreateVolume, C.create_volume(
                args.name, parse_size(args.size), parameters=_kv(args.param), block=args.block,
                fs_type=args.fs_type, source=args.source))
        elif args.action == "list":
            out = cl.call(cl.controller.ListVolumes, pb.ListVolumesRequest(max_entries=args.max_entries))
        elif args.action == "get":
            out = cl.call(cl.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=args.id))
        elif args.action == "expand":
            out = cl.call(cl.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
                volume_id=args.id, capacity_range=pb.CapacityRange(required_bytes=parse_size(args.size))))
        elif args.action == "delete":
            out = cl.call(cl.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=args.id))
        elif args.action == "publish":
            out = cl.call(cl.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
                volume_id=args.id, node_id=args.node, volume_capability=C.capability(block=args.block),
                readonly=args.readonly))
        elif args.action == "unpublish":
            out = cl.call(cl.controller.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(
                volume_id=args.id, node_id=args.node))
        else:
            raise errors.InvalidRequest(f"unknown action {args.action}")
    finally:
        cl.close()
    print(C.dumps(out))
    return 0


def cmd_pair(args: argparse.Namespace) -> int:
    from csi_virtvol.csi import client as C

    vpb = C.vpb_
    cl = C.Client(args.endpoint)
    try:
        if args.action == "list":
            out = cl.call(cl.pairs.ListPairs, vpb.ListPairsRequest(source=args.source))
        else:
            out = cl.call(cl.pairs.ResyncPair, vpb.ResyncPairRequest(target=args.target))
    finally:
        cl.close()
    print(C.dumps(out))
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    """The Identity service, as a CO asks it. `probe` exits 0 only when the plugin says it
    is ready, so a script (the image's smoke check) can wait on it."""
    from csi_virtvol.csi import client as C

    pb = C.pb_
    cl = C.Client(args.endpoint)
    try:
        if args.wait > 0:
            cl.wait_ready(timeout=args.wait)
        if args.action == "probe":
            out = cl.call(cl.identity.Probe, pb.ProbeRequest())
        elif args.action == "info":
            out = cl.call(cl.identity.GetPluginInfo, pb.GetPluginInfoRequest())
        else:
            out = cl.call(cl.identity.GetPluginCapabilities, pb.GetPluginCapabilitiesRequest())
    finally:
        cl.close()
    print(C.dumps(out))
    if args.action == "probe" and out.get("ready") is not True:
        # CSI: an unset `ready` leaves readiness to the CO; a smoke check wants a yes
        print("csi-virtvol: the plugin is not ready", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Serve on a temporary data dir and walk one volume through its life."""
    from csi_virtvol import app
    from csi_virtvol.csi import client as C

    pb = C.pb_
    data = args.data_dir or tempfile.mkdtemp(prefix="virtvol-demo-")
    endpoint = f"unix://{data}/csi.sock"
    config = load_config(endpoint=endpoint, data_dir=data, node_id=args.node_id, mode="all")
    stop = threading.Event()
    server = threading.Thread(target=app.serve, args=(config,), kwargs={"stop": stop}, daemon=True)
    server.start()
    cl = C.Client(endpoint)

    def step(text: str) -> None:
        print(f"\n== {text}", flush=True)

    # Whatever happens (an error, Ctrl-C, SIGTERM), the demo takes down what it set up:
    # mounts and loop devices outlive the process otherwise.
    undo = contextlib.ExitStack()

    def quietly(fn: Any, req: Any) -> None:
        try:
            cl.call(fn, req)
        except Exception as e:  # noqa: BLE001 - best effort, already failing
            print(f"(cleanup: {e})", file=sys.stderr)

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cl.wait_ready()
        step("plugin")
        print(C.dumps(cl.call(cl.identity.GetPluginInfo, pb.GetPluginInfoRequest())))
        step("create a 96 MiB volume spread over both pools (layout concat, maxExtentSize 48Mi)")
        vol = cl.call(cl.controller.CreateVolume, C.create_volume(
            "demo-volume", 96 << 20, parameters={"layout": "concat", "maxExtentSize": "48Mi"}, fs_type="ext4"))
        print(C.dumps(vol))
        vid = vol["volume"]["volume_id"]
        undo.callback(quietly, cl.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
        undo.callback(quietly, cl.controller.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id=args.node_id))
        step("publish to this node")
        ctx = cl.call(cl.controller.ControllerPublishVolume, pb.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=args.node_id, volume_capability=C.capability(fs_type="ext4")))
        if os.geteuid() == 0:
            staging, target = f"{data}/staging", f"{data}/target"
            os.makedirs(staging, exist_ok=True)
            undo.callback(quietly, cl.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
                volume_id=vid, staging_target_path=staging))
            undo.callback(quietly, cl.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(
                volume_id=vid, target_path=target))
            step("stage (assemble one block device, mkfs ext4, mount) and publish")
            cap = C.capability(fs_type="ext4")
            cl.call(cl.node.NodeStageVolume, pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=staging, volume_capability=cap,
                publish_context=ctx.get("publish_context", {})))
            cl.call(cl.node.NodePublishVolume, pb.NodePublishVolumeRequest(
                volume_id=vid, staging_target_path=staging, target_path=target, volume_capability=cap))
            payload = os.urandom(64 << 20)
            with open(f"{target}/data.bin", "wb") as fh:
                fh.write(payload)
                fh.flush()
                os.fsync(fh.fileno())
            with open(f"{target}/data.bin", "rb") as rh:
                same = rh.read() == payload
            print(f"wrote 64 MiB across the extent boundary; read back identical: {same}")
            step("expand online to 160 MiB")
            cl.call(cl.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
                volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=160 << 20)))
            online = True
            try:
                cl.call(cl.node.NodeExpandVolume, pb.NodeExpandVolumeRequest(
                    volume_id=vid, volume_path=target, staging_target_path=staging,
                    capacity_range=pb.CapacityRange(required_bytes=160 << 20)))
            except errors.BackendError as e:  # e.g. a sandbox without CAP_SYS_RESOURCE
                online = False
                print(f"the node could not grow ext4 while mounted: {e}")
            step("unpublish and unstage")
            cl.call(cl.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target))
            cl.call(cl.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
            step("stage again" + ("" if online else ": the filesystem is grown offline before it is mounted"))
            cl.call(cl.node.NodeStageVolume, pb.NodeStageVolumeRequest(
                volume_id=vid, staging_target_path=staging, volume_capability=cap,
                publish_context=ctx.get("publish_context", {})))
            st = os.statvfs(staging)
            print(f"filesystem size now {st.f_blocks * st.f_frsize >> 20} MiB (volume 160 MiB)")
            with open(f"{staging}/data.bin", "rb") as rh:
                print(f"data still identical: {rh.read() == payload}")
            cl.call(cl.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging))
        else:
            print("(not root: skipping the node steps, which need loop devices and mounts)")
        cl.call(cl.controller.ControllerUnpublishVolume, pb.ControllerUnpublishVolumeRequest(
            volume_id=vid, node_id=args.node_id))
        step("volume as the controller sees it")
        print(C.dumps(cl.call(cl.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=vid))))
        step("delete")
        cl.call(cl.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vid))
        left = [f for d in ("pool-a", "pool-b") for f in os.listdir(f"{data}/arrays/{d}/luns")
                if not f.startswith(".")] if os.path.isdir(f"{data}/arrays/pool-a/luns") else []
        print(f"LUN files left behind: {len(left)}")
        print("\ndemo finished: OK")
        undo.pop_all()
        return 0
    finally:
        with contextlib.suppress(KeyboardInterrupt):
            undo.close()
        cl.close()
        stop.set()
        server.join(timeout=15)
        time.sleep(0.1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csi-virtvol", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("VIRTVOL_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the CSI plugin")
    s.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", ""), help="unix:///path/csi.sock")
    s.add_argument("--data-dir", default="", help="state and default arrays live here")
    s.add_argument("--node-id", default=os.environ.get("NODE_ID", ""))
    s.add_argument("--mode", default="all", choices=["all", "controller", "node"])
    s.add_argument("--config", default="", help="YAML file describing arrays")
    s.add_argument("--store", default="", choices=["", "sqlite", "crd"])
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="serve on a temporary dir and walk a volume through its life")
    d.add_argument("--data-dir", default="")
    d.add_argument("--node-id", default="demo-node")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("volume", help="CSI client: volumes")
    v.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///run/csi-virtvol/csi.sock"))
    vs = v.add_subparsers(dest="action", required=True)
    c = vs.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", default="1Gi")
    c.add_argument("--param", action="append", default=[], help="key=value (StorageClass parameter)")
    c.add_argument("--block", action="store_true")
    c.add_argument("--fs-type", default="")
    c.add_argument("--source", default="", help="snapshot:ID or volume:ID")
    ls = vs.add_parser("list")
    ls.add_argument("--max-entries", type=int, default=0)
    for name in ("get", "delete"):
        vs.add_parser(name).add_argument("id")
    e = vs.add_parser("expand")
    e.add_argument("id")
    e.add_argument("--size", required=True)
    for name in ("publish", "unpublish"):
        pp = vs.add_parser(name)
        pp.add_argument("id")
        pp.add_argument("--node", required=True)
        if name == "publish":
            pp.add_argument("--block", action="store_true")
            pp.add_argument("--readonly", action="store_true")
    v.set_defaults(func=cmd_volume)

    ident = sub.add_parser("identity", help="CSI client: the Identity service (probe, plugin info, capabilities)")
    ident.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///run/csi-virtvol/csi.sock"))
    ident.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                       help="first wait up to SECONDS for the endpoint to accept connections")
    ident.add_argument("action", choices=["probe", "info", "capabilities"])
    ident.set_defaults(func=cmd_identity)

    pr = sub.add_parser("pair", help="the pair table: list pairs, resync a split one")
    pr.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///run/csi-virtvol/csi.sock"))
    ps = pr.add_subparsers(dest="action", required=True)
    ps.add_parser("list").add_argument("--source", default="")
    ps.add_parser("resync").add_argument("target")
    pr.set_defaults(func=cmd_pair)

    sub.add_parser("copy", help="host copy of extents (what a copy pod runs); see copy --help", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["copy"]:
        _setup_logging(os.environ.get("VIRTVOL_LOG_LEVEL", "info"))
        return cmd_copy(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except errors.VirtvolError as e:
        print(f"csi-virtvol: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
