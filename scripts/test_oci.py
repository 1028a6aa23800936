#!/usr/bin/env python3
"""End-to-end check of the OCI image that `make oci` builds.

Starts a Docker Distribution registry (Debian's docker-registry) on
127.0.0.1 with its storage in a temp dir and pushes target/oci to it with
skopeo. Then it checks the digest the registry reports and pulls the image
back. It extracts plugin.wasm the way Istio's agent does
(pkg/wasm/imagefetcher.go): the image has one layer, of media type
application/vnd.oci.image.layer.v1.tar+gzip, and the tar entry whose base
name is plugin.wasm is the module. Last, it runs `envoy --mode validate` on
envoy/demo.yaml pointed at the pulled module.

Usage: test_oci.py --layout target/oci --tag TAG --wasm FILE
Needs docker-registry, skopeo and $ENVOY_BIN (`make test-oci` installs the
first two).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

REGISTRY_READY_TIMEOUT_S = 20
COMMAND_TIMEOUT_S = 120
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
REPOSITORY = "mesh-fanout"
DEMO_WASM_PATH = "target/wasm32-wasip1/release/mesh_fanout.wasm"


class CheckFailed(Exception):
    pass


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(args):
    """Run a command and raise CheckFailed with its output if it fails."""
    result = subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise CheckFailed(f"{' '.join(args)} exited with {result.returncode}:\n{result.stdout}{result.stderr}")


def start_registry(work_dir):
    """Start docker-registry on a free 127.0.0.1 port and return (process, address)."""
    port = free_port()
    config = os.path.join(work_dir, "registry.yml")
    with open(config, "w") as config_file:
        config_file.write(
            "version: 0.1\n"
            "log:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {os.path.join(work_dir, 'storage')}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
    log = open(os.path.join(work_dir, "registry.log"), "w")
    process = subprocess.Popen(["docker-registry", "serve", config], stdout=log, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + REGISTRY_READY_TIMEOUT_S
    while True:
        if process.poll() is not None:
            raise CheckFailed(f"docker-registry exited with {process.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://{address}/v2/", timeout=2) as response:
                if response.status == 200:
                    return process, address
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() >= deadline:
            process.kill()
            raise CheckFailed(f"docker-registry was not ready on {address} within {REGISTRY_READY_TIMEOUT_S} s")
        time.sleep(0.05)


def stop(process):
    """Stop a process this script started, by its PID."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def read_layout(layout, tag):
    """Return (manifest digest, manifest bytes) of `tag` in an OCI image layout."""
    with open(os.path.join(layout, "index.json")) as index_file:
        index = json.load(index_file)
    for descriptor in index["manifests"]:
        if descriptor.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return descriptor["digest"], read_blob(layout, descriptor["digest"])
    raise CheckFailed(f"{layout}/index.json has no manifest tagged {tag!r}")


def read_blob(layout, digest):
    with open(os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1]), "rb") as blob:
        data = blob.read()
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise CheckFailed(f"blob {digest} in {layout} does not match its digest")
    return data


def extract_like_istio(layout, manifest_bytes):
    """Return plugin.wasm from the image, read as Istio's compat reader reads it."""
    manifest = json.loads(manifest_bytes)
    if manifest.get("annotations", {}).get("module.wasm.image/variant") != "compat":
        raise CheckFailed("manifest lacks the annotation module.wasm.image/variant=compat")
    layers = manifest["layers"]
    if len(layers) != 1:
        raise CheckFailed(f"expected 1 layer, found {len(layers)}")
    if layers[0]["mediaType"] != LAYER_MEDIA_TYPE:
        raise CheckFailed(f"layer media type is {layers[0]['mediaType']}, expected {LAYER_MEDIA_TYPE}")
    layer = read_blob(layout, layers[0]["digest"])
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        for member in tar.getmembers():
            if os.path.basename(member.name) == "plugin.wasm":
                return tar.extractfile(member).read()
    raise CheckFailed("plugin.wasm not found in the layer")


def validate_in_envoy(repo_root, module, work_dir):
    """Run `envoy --mode validate` on envoy/demo.yaml with the module at `module`."""
    with open(os.path.join(repo_root, "envoy", "demo.yaml")) as demo:
        config = demo.read()
    if DEMO_WASM_PATH not in config:
        raise CheckFailed(f"envoy/demo.yaml no longer loads {DEMO_WASM_PATH}; update this script")
    path = os.path.join(work_dir, "envoy.yaml")
    with open(path, "w") as out:
        out.write(config.replace(DEMO_WASM_PATH, module))
    envoy = os.environ.get("ENVOY_BIN") or os.path.join(repo_root, ".venv", "bin", "envoy")
    result = subprocess.run(
        [envoy, "--mode", "validate", "-l", "info", "-c", path],
        capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise CheckFailed(f"envoy --mode validate exited with {result.returncode}:\n{output}")
    # Envoy logs to stderr; the filter logs this line when its configuration loads.
    if "mesh-fanout configured" not in output:
        raise CheckFailed(f"Envoy validated the config, but the filter did not log its start:\n{output}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", required=True, help="OCI image layout that `make oci` wrote")
    parser.add_argument("--tag", required=True, help="tag of the image in the layout")
    parser.add_argument("--wasm", required=True, help="the module the image was built from")
    args = parser.parse_args()
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    expected_digest, _ = read_layout(args.layout, args.tag)
    with open(args.wasm, "rb") as wasm_file:
        wasm = wasm_file.read()

    work_dir = tempfile.mkdtemp(prefix="mesh-fanout-oci-")
    registry = None
    passed = failed = 0
    try:
        registry, address = start_registry(work_dir)
        reference = f"{address}/{REPOSITORY}:{args.tag}"
        def push():
            run(["skopeo", "copy", "--quiet", "--preserve-digests", "--dest-tls-verify=false",
                 f"oci:{args.layout}:{args.tag}", f"docker://{reference}"])

        def registry_digest():
            request = urllib.request.Request(
                f"http://{address}/v2/{REPOSITORY}/manifests/{args.tag}", headers={"Accept": MANIFEST_MEDIA_TYPE})
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                header = response.headers.get("Docker-Content-Digest")
            body_digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if (header, body_digest) != (expected_digest, expected_digest):
                raise CheckFailed(
                    f"registry serves digest {header} (body {body_digest}), expected {expected_digest}")

        pulled = os.path.join(work_dir, "pulled")

        def pull():
            run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{reference}", f"oci:{pulled}:{args.tag}"])
            digest, _ = read_layout(pulled, args.tag)
            if digest != expected_digest:
                raise CheckFailed(f"pulled manifest digest {digest}, expected {expected_digest}")

        module = os.path.join(work_dir, "plugin.wasm")

        def extract():
            _, manifest_bytes = read_layout(pulled, args.tag)
            extracted = extract_like_istio(pulled, manifest_bytes)
            if extracted != wasm:
                raise CheckFailed(f"pulled plugin.wasm ({len(extracted)} bytes) differs from {args.wasm} ({len(wasm)} bytes)")
            with open(module, "wb") as out:
                out.write(extracted)

        steps = [
            ("push with skopeo", push),
            ("registry reports the built digest", registry_digest),
            ("pull with skopeo keeps the digest", pull),
            ("plugin.wasm extracts as Istio reads it", extract),
            ("pulled module loads in envoy --mode validate", lambda: validate_in_envoy(repo_root, module, work_dir)),
        ]
        for name, step in steps:
            try:
                step()
            except (CheckFailed, OSError, subprocess.TimeoutExpired, urllib.error.URLError) as error:
                failed += 1
                print(f"FAILED {name}: {error}")
                # Later steps depend on this one.
                break
            passed += 1
            print(f"ok {name}")
    except CheckFailed as error:
        failed += 1
        print(f"FAILED registry start: {error}")
    finally:
        if registry is not None:
            stop(registry)
        if failed:
            print(f"files kept in {work_dir}")
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    print(f"test-oci: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
