#!/usr/bin/env python3
"""Check an environment against deploy/identity.lock.json and name everything that differs.

  python3 check_identity_lock.py [--lock FILE] [--comfyui DIR] [--object-info FILE_OR_URL] [--models DIR]

--comfyui DIR        each pinned pack is checked out in DIR/custom_nodes/<name> at its commit (git HEAD)
--object-info X      a saved `GET /object_info` or a ComfyUI base URL: every class each route needs is
                     registered, each pack's classes by that pack (python_module custom_nodes.<name>)
--models DIR         every model file a route loads is on the volume, non-empty, and matches the
                     lock's bytes/sha256 where the lock has them
Exit 0 when all given checks pass, 1 otherwise (each problem on its own line), 2 on bad usage.
Standard library only: it runs in the image builder and on a bare machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def load_object_info(source: str) -> dict:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as r:
            return json.load(r)
    with open(source) as f:
        return json.load(f)


def check_commits(lock: dict, comfyui: str) -> list[str]:
    problems = []
    for pack in lock["custom_nodes"]:
        path = os.path.join(comfyui, "custom_nodes", pack["name"])
        if not os.path.isdir(path):
            problems.append(f"custom node {pack['name']}: not installed in custom_nodes/")
            continue
        try:
            head = subprocess.run(["git", "-C", path, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            problems.append(f"custom node {pack['name']}: not a git checkout, its commit cannot be checked")
            continue
        if head != pack["commit"]:
            problems.append(f"custom node {pack['name']}: at {head}, the lock pins {pack['commit']}")
    return problems


def check_classes(lock: dict, info: dict) -> list[str]:
    problems = []
    for pack in lock["custom_nodes"]:
        module = f"custom_nodes.{pack['name']}"
        for cls in pack["classes"]:
            if cls not in info:
                problems.append(f"node class {cls} ({pack['name']}): not registered")
            elif info[cls].get("python_module") != module:
                problems.append(f"node class {cls}: registered by {info[cls].get('python_module')}, the lock pins {module}")
    for route, spec in lock["routes"].items():
        missing = [c for c in spec["node_classes"] if c not in info]
        if missing:
            problems.append(f"route {route}: node classes missing: {', '.join(missing)}")
    return problems


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_models(lock: dict, models: str) -> list[str]:
    problems = []
    known = {m["path"]: m for m in lock["models"]}
    needed = sorted({p for spec in lock["routes"].values() for p in spec["models"]})
    for rel in needed:
        path = os.path.join(models, rel)
        routes = [r for r, spec in lock["routes"].items() if rel in spec["models"]]
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            problems.append(f"model {rel} (for {', '.join(routes)}): missing or empty")
            continue
        want = known.get(rel, {})
        if want.get("bytes") is not None and os.path.getsize(path) != want["bytes"]:
            problems.append(f"model {rel}: {os.path.getsize(path)} bytes, the lock says {want['bytes']}")
        elif want.get("sha256") and sha256_of(path) != want["sha256"]:
            problems.append(f"model {rel}: sha256 differs from the lock")
    return problems


def lint(lock: dict) -> list[str]:
    """The lock itself: full commits, every route model listed with a source."""
    problems = []
    for pack in lock["custom_nodes"]:
        if len(pack["commit"]) != 40 or any(c not in "0123456789abcdef" for c in pack["commit"]):
            problems.append(f"lock: {pack['name']} commit is not a full hex commit")
    listed = {m["path"] for m in lock["models"]}
    for route, spec in lock["routes"].items():
        for rel in spec["models"]:
            if rel not in listed:
                problems.append(f"lock: {route} loads {rel}, which has no entry in models")
    return problems


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lock", default=os.path.join(HERE, "identity.lock.json"))
    ap.add_argument("--comfyui")
    ap.add_argument("--object-info")
    ap.add_argument("--models")
    args = ap.parse_args(argv)
    with open(args.lock) as f:
        lock = json.load(f)
    problems = lint(lock)
    if args.comfyui:
        problems += check_commits(lock, args.comfyui)
    if args.object_info:
        problems += check_classes(lock, load_object_info(args.object_info))
    if args.models:
        problems += check_models(lock, args.models)
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print("identity lock: ok (" + ", ".join(k for k in ("comfyui", "object_info", "models") if getattr(args, k)) + ")")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
