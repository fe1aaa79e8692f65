"""The image's build context and its install step carry every source tree setup.py installs from.

A package directory added to setup.py but not to docker/Dockerfile.dockerignore and the Dockerfile's copy step
breaks only the image build, which runs in CI's slow stage after the default tests have passed (kernels/ did
exactly that). Read statically here, so the default run catches it in milliseconds on any machine.
"""

import ast
import re

from tests.helpers import REPO


def _source_trees_setup_installs_from() -> set[str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    dirs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "package_dir" and isinstance(node.value, ast.Dict):
            dirs |= {value.value.split("/")[0] for value in node.value.values if isinstance(value, ast.Constant)}
        if isinstance(node, ast.keyword) and node.arg == "packages":
            dirs |= {
                sub.value.split(".")[0]
                for sub in ast.walk(node.value)
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and "*" not in sub.value
            }
    dirs.discard("")
    return {d for d in dirs if (REPO / d).is_dir()}


def test_the_build_context_and_copy_step_hold_every_installed_source_tree():
    needed = _source_trees_setup_installs_from() | {"setup.py", "pyproject.toml", "README.md"}
    assert {"connito", "configs", "kernels"} <= needed  # the parse above found setup.py's trees

    kept = {
        line[1:].strip()
        for line in (REPO / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    missing_context = sorted(needed - kept)
    assert not missing_context, f"add '!{missing_context[0]}' to docker/Dockerfile.dockerignore"

    copy = re.search(r"cp -r ([^;]+) /tmp/src/;", (REPO / "docker" / "Dockerfile").read_text())
    assert copy, "docker/Dockerfile no longer copies the sources with 'cp -r ... /tmp/src/;': update this test"
    missing_copy = sorted(needed - set(copy.group(1).split()))
    assert not missing_copy, f"add {missing_copy} to the 'cp -r' of docker/Dockerfile's install step"
