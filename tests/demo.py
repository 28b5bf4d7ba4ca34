"""`make demo`: the main job end to end on the embedded default, with nothing but loopback.

1. starts a local ``docker-registry`` standing in for gcr.io and seeds it with generated
   images named ``gcr.io/...`` (the endpoint override of the config), and a second one
   standing in for the site's mirror (namespace ``test-namespace``);
2. writes ``demo-work/pipeline.yaml`` (the connected side) and ``demo-work/site.yaml``
   (the disconnected site), with a ``file://`` object store between them;
3. runs the Luigi DAG ``ReleaseBundle`` (``bmsync run release``): resolve and pin the
   tags, pull each image, build ``bmpackages_demo.tar.zst``, publish it; then again,
   which does nothing;
4. runs ``ImportBundle`` (``bmsync run import``): fetch, verify, push into the mirror,
   verify the mirror, write the nodes' containerd config; then again, which moves nothing;
5. checks the mirror with ``bmsync verify`` and with skopeo, the independent reader, and
   prints a summary of what was built, where, and what to look at.

Every command is printed before it runs, so the output doubles as a walkthrough.
The registries are stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import hashlib
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


def _run(cmd: list[str], *, echo: bool = True, show: bool = True) -> str:
    if show:
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
        print(f"== a second one stands in for the site's mirror at {mirror.url}")

        objects = f"file://{work / 'objects'}"
        config = work / "pipeline.yaml"
        lines = [
            "# Written by `make demo`: gcr.io is served by a local registry.",
            "version: 1",
            'release: "demo"',
            "registries:",
            "  gcr.io:",
            f"    endpoint: {registry.url}",
            "images:",
            *[f"  - gcr.io/{img.reference}" for img in seeded],
            "workDir: connected            # lock files and archives, per version",
            "store: store                  # the shared OCI store",
            f"objectStore: {objects}",
        ]
        config.write_text("\n".join(lines) + "\n")
        print(f"\n== the connected side's config ({config.relative_to(ROOT)})")
        print(config.read_text(), end="")

        print("\n== cut and publish the release: ReleaseBundle (resolve, pull, build, publish)")
        _run([bmsync, "run", "release", "--config", str(config), "--workers", "2"])
        print("\n== again: every step's target exists, so nothing runs")
        _run([bmsync, "run", "release", "--config", str(config)])
        archive = work / "connected" / "demo" / "bmpackages_demo.tar.zst"
        print("\n== what was published, and what is in it (read from bundle.json alone)")
        _run([bmsync, "catalog", "--from", objects])
        _run([bmsync, "bundle", "inspect", str(archive)])

        target = f"http://{mirror.host}/test-namespace"
        site = work / "site.yaml"
        site.write_text("\n".join([
            "# Written by `make demo`: the disconnected site.",
            "version: 1",
            f"objectStore: {objects}     # after the air gap",
            "workDir: site                 # fetched archives and step reports",
            "mirrors:",
            f"  - url: {target}",
            "    needCredential: false",
            "containerd:",
            "  out: node-config            # what nodes get: certs.d/, config.toml, ...",
        ]) + "\n")
        print(f"\n== the disconnected site's config ({site.relative_to(ROOT)})")
        print(site.read_text(), end="")
        print("\n== import the latest version: ImportBundle (fetch, verify, push, verify,"
              " containerd config)")
        _run([bmsync, "run", "import", "--config", str(site)])
        print("\n== again: the mirror already serves every tag, nothing moves")
        mark = mirror.mark()
        _run([bmsync, "run", "import", "--config", str(site)])
        writes = [e for e in mirror.since(mark) if e.method in ("PUT", "POST", "PATCH")]
        print(f"   the mirror's access log: {len(writes)} writes during the second import")
        if writes:
            raise SystemExit("demo: the second import wrote to the mirror")

        fetched = work / "site" / "demo" / "bmpackages_demo.tar.zst"
        print("\n== check that the mirror holds exactly the bundle")
        _run([bmsync, "verify", f"--source={fetched}", f"--private-registry={target}",
              "--need-credential=false"])

        print("\n== skopeo, the independent reader, compares the mirror with gcr.io's stand-in")
        for img in seeded:
            raw = _run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                        f"docker://{mirror.host}/test-namespace/{img.reference}"],
                       echo=False, show=False)
            mirrored = "sha256:" + hashlib.sha256(raw.encode()).hexdigest()
            if mirrored != img.digest:
                raise SystemExit(f"demo: the mirror serves {mirrored} for {img.reference},"
                                 f" not {img.digest}")
            print(f"   gcr.io/{img.reference}  {mirrored[:19]}...  same digest")
        hosts = work / "node-config" / "certs.d" / "gcr.io" / "hosts.toml"
        print(f"\n== what nodes get: {hosts.relative_to(ROOT)}")
        print(hosts.read_text(), end="")
    finally:
        registry.close()
        mirror.close()
    rel = work.relative_to(ROOT)
    print(f"""
demo done; the registries have been stopped. Look at, in {rel}/:
  pipeline.yaml, site.yaml      the two configs (see configs/ for annotated examples)
  connected/demo/lock.json      the digests the release pinned
  connected/demo/               bmpackages_demo.tar.zst with its .sha256 and .bundle.json
  store/                        the shared OCI store (skopeo reads it: oci:{rel}/store:REF)
  objects/                      the object store: catalog.json and demo/
  site/demo/                    what the site fetched, and its verify and mirror reports
  node-config/                  certs.d/gcr.io/hosts.toml, config.toml, registries.conf, ...
{len(seeded)} images: the mirror serves each with the digest gcr.io's stand-in has.""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
