"""The installed package is the one in the tree: every subpackage is listed in pyproject.toml, so a
wheel (not only an editable install, which finds folders by itself) carries it."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, dirs = set(tool["packages"]), tool["package-dir"]
    on_disk = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *rel.parts]))
    assert on_disk <= packages, f"not in pyproject.toml's packages: {sorted(on_disk - packages)}"
    assert packages <= on_disk, f"listed but missing: {sorted(packages - on_disk)}"
