"""One import namespace: the wheel holds ``nodecache/`` and nothing else at the top, every
package folder of the source tree is in it, and the installed package works from a folder
whose own ``agent/``, ``cache/`` or ``serve/`` would shadow a bare import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIERS = {"agent": "nodecache.agent", "cache": "nodecache.cache", "serve": "nodecache.serve"}


def source_modules() -> set[str]:
    """Every module of the source tree, under its installed name."""
    names = set()
    for folder, package in TIERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            names.add(".".join([package, *relative.parts]))
    return names


def test_the_wheel_holds_nodecache_and_every_module(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "--quiet", "--wheel-dir", str(tmp_path)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("nodecache-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"nodecache", wheel.name.split("-py")[0] + ".dist-info"}, tops
    modules = {n.removesuffix(".py").replace("/", ".") for n in names if n.endswith(".py")}
    missing = source_modules() - modules
    assert not missing, f"not in the wheel (list their packages in pyproject.toml): {missing}"
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py')[0]}.dist-info/"
                                               "entry_points.txt").decode()  # fmt: skip
    assert "nodecache = nodecache.agent.cli:main" in entry_points


def test_the_installed_package_is_used_outside_the_checkout(tmp_path: Path) -> None:
    for folder in TIERS:  # would shadow a bare `import serve` from this working directory
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("raise SystemExit('shadowed')\n")
    shown = subprocess.run(
        [str(Path(sys.executable).with_name("nodecache")), "--help"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "usage: nodecache" in shown.stdout
    found = subprocess.run(
        [sys.executable, "-c", "import nodecache.serve, nodecache.cache, nodecache.agent.cli;"
         "print(nodecache.serve.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(found.stdout.strip()).is_relative_to(ROOT / "serve")
