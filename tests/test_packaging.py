"""Issue 16, part 3: the shipped weights install with the package. A wheel built from this tree, installed outside
it, loads every learned name from its own package data, from another directory."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("hyperadam", "hyperadam-general", "dm", "rnnprop", "cam-hd-learned-gamma", "marthe-learned-mu")


def test_every_package_of_the_tree_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set(setuptools.find_packages(where=str(ROOT), include=["metaopt*", "meta_tasks*"]))
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"


def test_a_built_wheel_loads_the_shipped_weights_from_another_directory(tmp_path):
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True)
    (wheel,) = wheels.glob("metaopt-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    script = f"""
import torch, metaopt
from pathlib import Path
from metaopt.learned.base import CHECKPOINT_ROOT
site = Path({str(site)!r}).resolve()
assert Path(metaopt.__file__).resolve().is_relative_to(site), metaopt.__file__
assert CHECKPOINT_ROOT == site / "metaopt" / "checkpoints", CHECKPOINT_ROOT
model = torch.nn.Linear(4, 2)
opt = metaopt.make_optimizer("hyperadam", model.parameters())
model(torch.ones(3, 4)).sum().backward()
opt.step()
for name in {SHIPPED!r}:
    metaopt.from_pretrained(name)
print("ok")
"""
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "OMP_NUM_THREADS": "1",
           "METAOPT_CHECKPOINTS": ""}
    env.pop("METAOPT_CHECKPOINTS")
    out = subprocess.run([sys.executable, "-c", script], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
