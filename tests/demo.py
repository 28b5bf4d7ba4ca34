"""`make demo`: the main job end to end on the embedded default, with nothing but loopback.

1. starts a local ``docker-registry`` standing in for gcr.io and seeds it with generated
   images (the same generator the tests and benchmarks use);
2. writes ``demo-work/images.yaml`` pointing gcr.io at that registry;
3. runs ``bmsync pull`` twice (cold, then warm) into ``demo-work/store``;
4. cuts the release's archive with ``bmsync bundle build`` and inspects it;
5. publishes it to a ``file://`` object store, then, as the site, fetches and verifies it;
6. pushes it into a second local registry standing in for the site's mirror (namespace
   ``test-namespace``), twice: the second push moves nothing; verifies the mirror and
   writes the nodes' containerd, CRI-O and cluster configuration for it;
7. reads the mirror and the extracted layout back with skopeo, the independent reader.

Every command is printed before it runs, so the output doubles as a walkthrough.
The registries are stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

from tests.harness.images import seed_image_set
from tests.harness.registry import start_registry

ROOT = Path(__file__).resolve().parent.parent
BMSYNC = ROOT / ".venv" / "bin" / "bmsync"


def _show(cmd: list[str]) -> None:
    shown = [str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c for c in cmd]
    print(f"\n$ {' '.join(shown)}", flush=True)


def _run(cmd: list[str], *, echo: bool = True) -> str:
    _show(cmd)
    done = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True)
    # Log lines (stderr) first, then the summary they lead to.
    sys.stdout.write(done.stderr)
    if echo:
        sys.stdout.write(done.stdout)
    sys.stdout.flush()
    if done.returncode != 0:
        raise SystemExit(f"demo: command failed with exit code {done.returncode}")
    return done.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "demo-work",
                        help="demo directory (recreated; default demo-work/)")
    parser.add_argument("--images", type=int, default=8, help="images to generate")
    parser.add_argument("--mb", type=float, default=120, help="unique MB to generate")
    args = parser.parse_args(argv)

    work: Path = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    bmsync = str(BMSYNC if BMSYNC.exists() else "bmsync")

    registry = start_registry(work / "gcr-stand-in")
    mirror = start_registry(work / "mirror")
    try:
        print(f"== a local registry stands in for gcr.io at {registry.url}")
        seeded = seed_image_set(registry.url, images=args.images, total_mb=args.mb, seed=7)
        print(f"   seeded {len(seeded)} generated images"
              f" ({sum(i.content_size for i in seeded) / 1e6:.0f} MB with shared layers)")

        config = work / "images.yaml"
        lines = [
            "# Written by `make demo`: gcr.io is served by a local registry.",
            "version: 1",
            'release: "demo"',
            "registries:",
            "  gcr.io:",
            f"    endpoint: {registry.url}",
            "images:",
        ] + [f"  - gcr.io/{img.reference}" for img in seeded]
        config.write_text("\n".join(lines) + "\n")
        print(f"\n== the release's images config ({config.relative_to(ROOT)})")
        print(config.read_text(), end="")

        store = work / "store"
        print("\n== pull the release into the shared store (cold)")
        _run([bmsync, "pull", "--config", str(config), "--store", str(store)])
        print("\n== pull again: nothing moves, one request per image")
        _run([bmsync, "pull", "--config", str(config), "--store", str(store)])

        out = work / "out"
        print("\n== cut the release's archive (the store is warm: nothing is pulled)")
        _run([bmsync, "-q", "bundle", "build", "--config", str(config), "--store", str(store),
              "--out", str(out)])
        archive = out / "bmpackages_demo.tar.zst"
        print("\n== what is in it, read from bundle.json alone")
        _run([bmsync, "bundle", "inspect", str(archive)])
        objects = f"file://{work / 'objects'}"
        print("\n== publish it to object storage (file://: no server needed)")
        _run([bmsync, "publish", str(archive), "--to", objects])
        _run([bmsync, "catalog", "--from", objects])

        print("\n== the disconnected site: fetch the latest version, verified")
        site = work / "site"
        _run([bmsync, "fetch", "--from", objects, "--release", "latest", "--to", str(site)])
        archive = site / "bmpackages_demo.tar.zst"
        print("\n== check every byte against the sidecar and bundle.json")
        _run([bmsync, "bundle", "verify", str(archive)])
        print("\n== unpack it into a standard OCI layout")
        layout = work / "layout"
        _run([bmsync, "bundle", "extract", str(archive), "--to", str(layout)])

        print(f"\n== push into the site's mirror (a second local registry, {mirror.url})")
        target = f"--private-registry=http://{mirror.host}/test-namespace"
        _run([bmsync, "push", "images", f"--source={archive}", target,
              "--need-credential=false"])
        print("\n== push again: one request per image, nothing moves")
        _run([bmsync, "push", "images", f"--source={archive}", target,
              "--need-credential=false"])

        print("\n== check that the mirror holds exactly the bundle")
        _run([bmsync, "verify", f"--source={archive}", target, "--need-credential=false"])
        print("\n== the nodes' configuration: containerd hosts.toml, config.toml, CRI-O, cluster")
        _run([bmsync, "containerd", "config", target, "--out", str(work / "node-config")])

        oci = next((i for i in seeded if "oci" in i.media_type), seeded[0])
        ref = f"gcr.io/{oci.reference}"
        print("\n== skopeo reads the mirror: the digest is upstream's")
        raw = _run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                    f"docker://{mirror.host}/test-namespace/{oci.reference}"], echo=False)
        mirrored = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
        print(f"   digest in the mirror:   {mirrored}")
        print(f"   digest pushed upstream: {oci.digest}")
        if mirrored != oci.digest:
            raise SystemExit("demo: the mirror does not serve the upstream digest")
        print("\n== skopeo reads the unpacked archive as a standard OCI layout")
        raw = _run(["skopeo", "inspect", "--raw", f"oci:{layout}:{ref}"], echo=False)
        read_back = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
        media = json.loads(raw).get("mediaType")
        print(f"   {media}, {len(json.loads(raw)['layers'])} layers")
        print(f"   digest read back by skopeo: {read_back}")
        print(f"   digest pushed upstream:     {oci.digest}")
        if read_back != oci.digest:
            raise SystemExit("demo: the archive does not hold the upstream bytes")
    finally:
        registry.close()
        mirror.close()
    print(f"\ndemo done: in {work.relative_to(ROOT)}/: images.yaml, store/, out/ (the archive"
          " and its sidecars), objects/ (the object store), site/ (what the site fetched),"
          " layout/; the registries have been stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
