"""`csi-virtvol`: the plugin server, a CSI client (like csc), the copy tool, a demo."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
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


def _copy_source(args: argparse.Namespace) -> str:
    """`--from-snapshot ID`, `--from-volume ID` or the older `--source KIND:ID`."""
    given = [s for s in (f"snapshot:{args.from_snapshot}" if args.from_snapshot else "",
                         f"volume:{args.from_volume}" if args.from_volume else "", args.source) if s]
    if len(given) > 1:
        raise errors.InvalidRequest("give one of --from-snapshot, --from-volume, --source")
    source = given[0] if given else ""
    kind, _, ident = source.partition(":")
    if source and (kind not in ("snapshot", "volume") or not ident):
        raise errors.InvalidRequest(f"--source must be snapshot:ID or volume:ID, not {source!r}")
    return source


def _source_size(cl: Any, source: str) -> int:
    """The size of a copy's source (a clone or restore is that big unless --size says more)."""
    from csi_virtvol.csi import client as C

    kind, _, ident = source.partition(":")
    if kind == "volume":
        got = cl.call(cl.controller.ControllerGetVolume, C.pb_.ControllerGetVolumeRequest(volume_id=ident))
        return int(got.get("volume", {}).get("capacity_bytes", 0))
    if kind == "snapshot":
        got = cl.call(cl.controller.ListSnapshots, C.pb_.ListSnapshotsRequest(snapshot_id=ident))
        entries = got.get("entries", [])
        if not entries:
            raise errors.NotFound(f"snapshot {ident} does not exist")
        return int(entries[0].get("snapshot", {}).get("size_bytes", 0))
    return 0


def _stopped_watching(what: str, source: str) -> int:
    print(f"\nstopped watching {what}; the driver goes on copying "
          f"(csi-virtvol pair list --source {source})", file=sys.stderr)
    return 130


def cmd_volume(args: argparse.Namespace) -> int:
    from csi_virtvol import console
    from csi_virtvol.csi import client as C

    pb = C.pb_
    cl = C.Client(args.endpoint)
    out: Mapping[str, Any]
    try:
        if args.action == "create":
            source = _copy_source(args)
            size = parse_size(args.size) if args.size else _source_size(cl, source) or 1 << 30
            req = C.create_volume(args.name, size, parameters=_kv(args.param), block=args.block,
                                  fs_type=args.fs_type, source=source)
            if not source:
                out = cl.call(cl.controller.CreateVolume, req)
            else:
                from csi_virtvol.services.volumes import volume_id_for
                try:
                    out = console.create_volume(cl, req, target_id=volume_id_for(args.name), wait=not args.no_wait,
                                                stream=_progress_stream(), timeout=args.timeout)
                except KeyboardInterrupt:
                    return _stopped_watching(f"volume {args.name}", source.partition(":")[2])
                except C.CallFailed as e:
                    if e.code != "ABORTED" or not args.no_wait:
                        raise
                    out = {"pending": e.details}
        elif args.action == "list":
            out = cl.call(cl.controller.ListVolumes, pb.ListVolumesRequest(max_entries=args.max_entries))
        elif args.action == "get":
            out = cl.call(cl.controller.ControllerGetVolume, pb.ControllerGetVolumeRequest(volume_id=args.id))
        elif args.action == "map":
            out = cl.call(cl.mapping.GetMapping, C.vpb_.GetMappingRequest(volume_id=args.id))
            if not args.json:
                print(f"{out.get('kind', '?')} {out.get('volume_id')} ({console.mib(console.num(out, 'size'))}, "
                      f"{out.get('state', '?')}):")
                print(console.mapping_table(out))
                return 0
        elif args.action == "expand":
            out = cl.call(cl.controller.ControllerExpandVolume, pb.ControllerExpandVolumeRequest(
                volume_id=args.id, capacity_range=pb.CapacityRange(required_bytes=parse_size(args.size))))
        elif args.action == "delete":
            out = cl.call(cl.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=args.id))
        elif args.action == "modify":
            out = cl.call(cl.controller.ControllerModifyVolume, pb.ControllerModifyVolumeRequest(
                volume_id=args.id, mutable_parameters=_kv(args.param)))
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


def _progress_stream() -> Any:
    """A bar on stdout when it is a terminal; else plain lines on stderr, so that stdout
    stays the JSON answer a script reads."""
    return sys.stdout if sys.stdout.isatty() else sys.stderr


def cmd_snapshot(args: argparse.Namespace) -> int:
    from csi_virtvol import console
    from csi_virtvol.csi import client as C

    pb = C.pb_
    cl = C.Client(args.endpoint)
    try:
        if args.action == "create":
            try:
                out = console.create_snapshot(cl, name=args.name, volume_id=args.volume, parameters=_kv(args.param),
                                              wait=not args.no_wait, stream=_progress_stream(),
                                              timeout=args.timeout)
            except KeyboardInterrupt:
                return _stopped_watching(f"snapshot {args.name}", args.volume)
        elif args.action == "list":
            entries: list[Any] = []
            token = ""
            while True:
                page = cl.call(cl.controller.ListSnapshots, pb.ListSnapshotsRequest(
                    source_volume_id=args.volume, snapshot_id=args.id, starting_token=token, max_entries=100))
                entries += page.get("entries", [])
                token = page.get("next_token", "")
                if not token:
                    break
            out = {"entries": entries}
        elif args.action == "delete":
            out = cl.call(cl.controller.DeleteSnapshot, pb.DeleteSnapshotRequest(snapshot_id=args.id))
        else:
            raise errors.InvalidRequest(f"unknown action {args.action}")
    finally:
        cl.close()
    print(C.dumps(out))
    return 0


def cmd_pair(args: argparse.Namespace) -> int:
    from csi_virtvol import console
    from csi_virtvol.csi import client as C

    vpb = C.vpb_
    cl = C.Client(args.endpoint)
    try:
        if args.action == "list":
            out = cl.call(cl.pairs.ListPairs, vpb.ListPairsRequest(source=args.source))
            if args.table:
                for pair in out.get("pairs", []):
                    print(console.pair_summary(pair))
                    print(console.plan_table(pair))
                return 0
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
    """Two arrays of different abilities, one volume over both, a snapshot while a writer
    runs, a restore and a clone checked byte for byte; then everything taken down."""
    from csi_virtvol import demo

    return demo.main(args)


def _wait_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-wait", action="store_true", help="answer at once, while the copy may still run")
    p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="stop waiting for the copy after this long (0: no limit)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csi-virtvol", description=__doc__)
    p.add_argument("--log-level", default=os.environ.get("VIRTVOL_LOG_LEVEL", ""),
                   help="default info (warning for the demo, whose own lines say what happens)")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the CSI plugin")
    s.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", ""), help="unix:///path/csi.sock")
    s.add_argument("--data-dir", default="", help="state and default arrays live here")
    s.add_argument("--node-id", default=os.environ.get("NODE_ID", ""))
    s.add_argument("--mode", default="all", choices=["all", "controller", "node"])
    s.add_argument("--config", default="", help="YAML file describing arrays")
    s.add_argument("--store", default="", choices=["", "sqlite", "crd"])
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="two arrays of different abilities, one volume over both, a snapshot "
                                     "while a writer runs, a restore and a clone checked byte for byte")
    d.add_argument("--node-id", default="demo-node")
    d.add_argument("--copy-bandwidth", default="16Mi", metavar="SIZE",
                   help="the volume's copyBandwidth, so that its host copies can be watched (0: full speed)")
    d.set_defaults(func=cmd_demo)

    v = sub.add_parser("volume", help="CSI client: volumes")
    v.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///run/csi-virtvol/csi.sock"))
    vs = v.add_subparsers(dest="action", required=True)
    c = vs.add_parser("create")
    c.add_argument("name")
    c.add_argument("--size", default="", help="default: the source's size, else 1Gi")
    c.add_argument("--param", action="append", default=[], help="key=value (StorageClass parameter)")
    c.add_argument("--block", action="store_true")
    c.add_argument("--fs-type", default="")
    c.add_argument("--from-snapshot", default="", metavar="ID", help="restore this snapshot into the new volume")
    c.add_argument("--from-volume", default="", metavar="ID", help="clone this volume")
    c.add_argument("--source", default="", help="snapshot:ID or volume:ID (same as --from-*)")
    _wait_flags(c)
    ls = vs.add_parser("list")
    ls.add_argument("--max-entries", type=int, default=0)
    for name in ("get", "delete"):
        vs.add_parser(name).add_argument("id")
    mo = vs.add_parser("modify", help="ControllerModifyVolume: maxExtentSize, arrays, copyBandwidth")
    mo.add_argument("id")
    mo.add_argument("--param", action="append", default=[], help="key=value (mutable parameter)")
    mp = vs.add_parser("map", help="the volume's (or snapshot's) extents: array, LUN, offset, length")
    mp.add_argument("id")
    mp.add_argument("--json", action="store_true")
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

    sn = sub.add_parser("snapshot", help="CSI client: snapshots (CreateSnapshot, ListSnapshots, DeleteSnapshot)")
    sn.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///run/csi-virtvol/csi.sock"))
    ss = sn.add_subparsers(dest="action", required=True)
    sc = ss.add_parser("create", help="snapshot a volume; shows the copy's progress until it is ready")
    sc.add_argument("name")
    sc.add_argument("--volume", required=True, metavar="ID", help="the source volume")
    sc.add_argument("--param", action="append", default=[], help="key=value (VolumeSnapshotClass parameter)")
    _wait_flags(sc)
    sl = ss.add_parser("list")
    sl.add_argument("--volume", default="", metavar="ID", help="only snapshots of this volume")
    sl.add_argument("--id", default="", help="only this snapshot")
    ss.add_parser("delete").add_argument("id")
    sn.set_defaults(func=cmd_snapshot)

    pr = sub.add_parser("pair", help="the pair table: list pairs, resync a split one")
    pr.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///run/csi-virtvol/csi.sock"))
    ps = pr.add_subparsers(dest="action", required=True)
    pl = ps.add_parser("list")
    pl.add_argument("--source", default="")
    pl.add_argument("--table", action="store_true", help="each pair's per-extent plan as a table")
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
    _setup_logging(args.log_level or ("warning" if args.command == "demo" else "info"))
    try:
        return int(args.func(args))
    except errors.VirtvolError as e:
        print(f"csi-virtvol: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
