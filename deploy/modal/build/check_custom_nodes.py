"""Import every custom node package the way ComfyUI does and fail (exit 1) unless each one
loads and registers the node classes we depend on. ComfyUI itself only logs "IMPORT FAILED"
and carries on; an image build must not.

Usage (from the ComfyUI directory): python check_custom_nodes.py NODE_DIR=Class,Class ...
"""

import importlib.util
import os
import sys


def main(argv: list[str]) -> int:
    sys.path.insert(0, os.getcwd())
    # No GPU in the image builder: let ComfyUI's model management pick the CPU.
    sys.argv = ["main.py", "--cpu"]
    import comfy.options

    if hasattr(comfy.options, "enable_args_parsing"):  # a no-op in recent ComfyUI, required in older
        comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401  (custom nodes import it at module level)

    failures = []
    for spec in argv:
        node_dir, _, classes = spec.partition("=")
        path = os.path.join("custom_nodes", node_dir)
        try:
            module_spec = importlib.util.spec_from_file_location(
                node_dir, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
            )
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[node_dir] = module
            module_spec.loader.exec_module(module)
        except Exception as error:  # any import error must fail the build
            failures.append(f"{node_dir}: import failed: {error!r}")
            continue
        registered = set(getattr(module, "NODE_CLASS_MAPPINGS", {}))
        missing = [c for c in classes.split(",") if c and c not in registered]
        if missing:
            failures.append(f"{node_dir}: node classes missing: {', '.join(missing)}")
        else:
            print(f"{node_dir}: ok ({len(registered)} node classes)")
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
