#!/usr/bin/env python3
"""Writes a one-layer OCI image (an OCI image-layout tar, what `ctr images import` and
`skopeo copy oci-archive:` read) from files on this machine, without a registry, a container
engine or a base image. The layer is a gzip'd tar with fixed owners and mtimes, so the same
inputs give the same image digest.

  oci-image.py --name bpfpoly.local/pause:3.4.1 --entrypoint /pause --user 65535:65535 \
      --file /tmp/pause:/pause --out pause.tar

--file SRC:DST copies a file (mode kept), --dir DST makes a directory (0755; `--dir /tmp`
is made 1777), --symlink TARGET:DST a symlink. Parent directories are added as needed.
Prints the image name, its manifest digest and its size.
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import sys
import tarfile

EPOCH = 0


def tar_info(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name.lstrip("/"))
    ti.type = kind
    ti.mode = mode
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    ti.mtime = EPOCH
    return ti


def build_layer(files: list[tuple[str, str]], dirs: list[str], links: list[tuple[str, str]]) -> bytes:
    entries: dict[str, tuple] = {}

    def add_parents(dst: str) -> None:
        parts = dst.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/" + "/".join(parts[:i])
            entries.setdefault(d, ("dir", 0o755))

    for d in dirs:
        add_parents(d)
        entries[d.rstrip("/")] = ("dir", 0o1777 if d.rstrip("/") == "/tmp" else 0o755)
    for src, dst in files:
        if not os.path.isfile(src):
            sys.exit(f"oci-image: --file {src}:{dst}: {src} is not a file")
        add_parents(dst)
        entries[dst] = ("file", src)
    for target, dst in links:
        add_parents(dst)
        entries[dst] = ("link", target)

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for path in sorted(entries):
            kind, arg = entries[path]
            if kind == "dir":
                tf.addfile(tar_info(path, tarfile.DIRTYPE, arg))
            elif kind == "link":
                ti = tar_info(path, tarfile.SYMTYPE, 0o777)
                ti.linkname = arg
                tf.addfile(ti)
            else:
                st = os.stat(arg)
                ti = tar_info(path, tarfile.REGTYPE, st.st_mode & 0o7777)
                ti.size = st.st_size
                with open(arg, "rb") as f:
                    tf.addfile(ti, f)
    return raw.getvalue()


def blob(out: tarfile.TarFile, data: bytes, media_type: str) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    ti = tar_info(f"blobs/sha256/{digest[7:]}", tarfile.REGTYPE, 0o644)
    ti.size = len(data)
    out.addfile(ti, io.BytesIO(data))
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True, help="image reference, e.g. bpfpoly/bpfpoly:0.1.0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--entrypoint", action="append", default=[])
    ap.add_argument("--cmd", action="append", default=[])
    ap.add_argument("--user", default="")
    ap.add_argument("--env", action="append", default=[])
    ap.add_argument("--workdir", default="/")
    ap.add_argument("--label", action="append", default=[])
    ap.add_argument("--file", action="append", default=[])
    ap.add_argument("--dir", action="append", default=[])
    ap.add_argument("--symlink", action="append", default=[])
    a = ap.parse_args()

    def pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
        out = []
        for it in items:
            src, sep, dst = it.rpartition(":")
            if not sep or not src or not dst.startswith("/"):
                sys.exit(f"oci-image: {flag} {it!r}: expected SRC:/ABSOLUTE/DST")
            out.append((src, dst))
        return out

    layer_tar = build_layer(pairs(a.file, "--file"), a.dir, pairs(a.symlink, "--symlink"))
    layer_gz = gzip.compress(layer_tar, compresslevel=9, mtime=EPOCH)
    labels = dict(lbl.split("=", 1) for lbl in a.label)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"] + a.env,
            "WorkingDir": a.workdir,
            **({"Entrypoint": a.entrypoint} if a.entrypoint else {}),
            **({"Cmd": a.cmd} if a.cmd else {}),
            **({"User": a.user} if a.user else {}),
            **({"Labels": labels} if labels else {}),
        },
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(layer_tar).hexdigest()]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "e2e/env/oci-image.py"}],
    }
    tag = a.name.rpartition(":")[2] if ":" in a.name.rpartition("/")[2] else "latest"
    tmp = a.out + ".part"
    with tarfile.open(tmp, mode="w") as out:
        cfg = blob(out, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
        lay = blob(out, layer_gz, "application/vnd.oci.image.layer.v1.tar+gzip")
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": cfg, "layers": [lay]}
        man = blob(out, json.dumps(manifest, sort_keys=True).encode(), "application/vnd.oci.image.manifest.v1+json")
        man["annotations"] = {"io.containerd.image.name": a.name, "org.opencontainers.image.ref.name": tag}
        man["platform"] = {"architecture": "amd64", "os": "linux"}
        for name, data in (("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"})),
                           ("index.json", json.dumps({"schemaVersion": 2, "manifests": [man]}))):
            ti = tar_info(name, tarfile.REGTYPE, 0o644)
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data.encode()))
    os.replace(tmp, a.out)
    print(f"oci-image: {a.name} {man['digest']} layer {len(layer_gz) / 2**20:.1f} MiB compressed, "
          f"{len(layer_tar) / 2**20:.1f} MiB unpacked")


if __name__ == "__main__":
    main()
