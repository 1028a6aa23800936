#!/usr/bin/env python3
"""Build an OCI image layout of the filter for Istio's WasmPlugin, without Docker.

The image is the "compat" variant of the Wasm image specification
(github.com/solo-io/wasm, spec/spec-compat.md), which Istio's agent reads
(pkg/wasm/imagefetcher.go). It has one layer of media type
application/vnd.oci.image.layer.v1.tar+gzip, a tar that contains
plugin.wasm, and the manifest annotation module.wasm.image/variant=compat.

The build is reproducible: the tar entry has a fixed mtime (SOURCE_DATE_EPOCH,
else 0), uid, gid and mode, gzip writes no file name or time, and every JSON
document is serialized with sorted keys. Rebuilding from the same .wasm with
the same Python and zlib gives the same digests.

Usage: oci_image.py --wasm FILE --out DIR --tag TAG
Prints the manifest digest, which is what WasmPlugin's `sha256` field and an
`oci://...@sha256:` URL refer to.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_MEDIA_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
# Istio's compat reader looks for this base name inside the layer.
WASM_FILE_NAME = "plugin.wasm"
WASM_MAGIC = b"\x00asm"


def canonical_json(document):
    """Serialize with sorted keys and no spaces, so equal documents give equal bytes."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def digest_of(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(wasm, mtime):
    """Return an uncompressed tar with the single entry plugin.wasm."""
    buffer = io.BytesIO()
    info = tarfile.TarInfo(WASM_FILE_NAME)
    info.size = len(wasm)
    info.mtime = mtime
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(wasm))
    return buffer.getvalue()


def gzip_bytes(data):
    """Compress with no file name and a zero header time, so the bytes depend on `data` alone."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as stream:
        stream.write(data)
    return buffer.getvalue()


def write_blob(blobs_dir, data):
    """Store `data` under blobs/sha256/<hex> and return its descriptor fields."""
    digest = digest_of(data)
    with open(os.path.join(blobs_dir, digest.split(":", 1)[1]), "wb") as blob:
        blob.write(data)
    return {"digest": digest, "size": len(data)}


def build(wasm_path, out_dir, tag):
    with open(wasm_path, "rb") as source:
        wasm = source.read()
    if not wasm.startswith(WASM_MAGIC):
        raise SystemExit(f"{wasm_path} is not a WebAssembly module (no \\0asm header); run `make build`")

    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    tar = layer_tar(wasm, mtime)
    layer = gzip_bytes(tar)

    # Remove blobs of earlier builds, so the layout contains this image only.
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    blobs_dir = os.path.join(out_dir, "blobs", "sha256")
    os.makedirs(blobs_dir)

    # The OCI image spec recommends Go's GOARCH and GOOS values for
    # architecture and os, and Go names a WASI preview 1 module wasm/wasip1.
    config = {
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]},
    }
    config_descriptor = {"mediaType": CONFIG_MEDIA_TYPE, **write_blob(blobs_dir, canonical_json(config))}
    layer_descriptor = {"mediaType": LAYER_MEDIA_TYPE, **write_blob(blobs_dir, layer)}

    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": config_descriptor,
        "layers": [layer_descriptor],
        "annotations": {"module.wasm.image/variant": "compat"},
    }
    manifest_descriptor = {"mediaType": MANIFEST_MEDIA_TYPE, **write_blob(blobs_dir, canonical_json(manifest))}
    # skopeo finds the image in the layout by this annotation (oci:DIR:TAG).
    manifest_descriptor["annotations"] = {"org.opencontainers.image.ref.name": tag}

    index = {"schemaVersion": 2, "mediaType": INDEX_MEDIA_TYPE, "manifests": [manifest_descriptor]}
    with open(os.path.join(out_dir, "index.json"), "wb") as index_file:
        index_file.write(canonical_json(index))
    with open(os.path.join(out_dir, "oci-layout"), "wb") as layout_file:
        layout_file.write(canonical_json({"imageLayoutVersion": "1.0.0"}))
    return manifest_descriptor["digest"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wasm", required=True, help="the filter module, e.g. target/wasm32-wasip1/release/mesh_fanout.wasm")
    parser.add_argument("--out", required=True, help="directory for the OCI image layout; replaced if it exists")
    parser.add_argument("--tag", required=True, help="tag recorded in index.json, e.g. 0.1.0")
    args = parser.parse_args()
    digest = build(args.wasm, args.out, args.tag)
    print(f"{args.out}: tag {args.tag}, manifest {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
