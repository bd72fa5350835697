"""diffshield as it is installed: what the wheel and the source distribution carry, and that the installed package
reads nothing from the repository around it (docs/, examples/, benchmarks/, a path above the package)."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diffshield  # noqa: F401  registers the shipped toy names
from diffshield.core.registry import MODEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "diffshield"
#: top-level folders of the repository that a pip install does not have
REPO_ONLY = ("docs/", "benchmarks/", "examples/", "scripts/", "tests/", "src/")
#: what neither distribution may carry
JUNK = ("__pycache__", ".pyc", ".pyo", ".egg-info", ".tmp", ".DS_Store")


@pytest.fixture(scope="module")
def selection(tmp_path_factory) -> dict[str, set[str]]:
    """The files setuptools puts in the wheel ("wheel": paths relative to the repository, under src/) and in the
    source distribution ("sdist"), read from pyproject.toml and MANIFEST.in without building either (0.5 s)."""
    pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    egg_base = tmp_path_factory.mktemp("egg_base")
    old = Path.cwd()
    os.chdir(ROOT)  # setuptools reads its configuration and globs relative to the project folder
    try:
        dist = Distribution()
        dist.script_name = "setup.py"
        apply_configuration(dist, "pyproject.toml")
        egg_info = dist.get_command_obj("egg_info")
        egg_info.egg_base = str(egg_base)  # its metadata goes here, not into the repository
        egg_info.ensure_finalized()
        egg_info.run()
        sdist = {f for f in egg_info.filelist.files if not Path(f).is_absolute()}
        build_py = dist.get_command_obj("build_py")
        build_py.ensure_finalized()
        wheel = {module[2] for module in build_py.find_all_modules()}
        wheel |= {os.path.join(src, name) for _, src, _, names in build_py.data_files for name in names}
    finally:
        os.chdir(old)
    return {"wheel": {Path(f).as_posix() for f in wheel}, "sdist": {Path(f).as_posix() for f in sdist}}


def _package_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _loaded_at_run_time() -> list[Path]:
    """The files and folders the code reads from the package at run time: the named toy models, the TERD
    calibration, the toy inpainter."""
    from diffshield.backdoor.terd import default_calibration_path
    from diffshield.protect.inpainters import TOY_INPAINTERS
    from diffshield.toyworld.names import TOY_ROOT

    paths = [MODEL_NAMES.get(name) for name in MODEL_NAMES.names()]
    paths += [default_calibration_path(), *(TOY_ROOT / sub for sub in TOY_INPAINTERS.values())]
    return paths


def test_wheel_ships_every_data_file_of_the_package(selection):
    missing = [p.relative_to(ROOT).as_posix() for p in _package_files()
               if p.relative_to(ROOT).as_posix() not in selection["wheel"]]
    assert not missing, f"in src/diffshield but not in the wheel (pyproject.toml's package-data): {missing}"


def test_wheel_ships_every_file_the_code_loads(selection):
    for path in _loaded_at_run_time():
        assert path.resolve().is_relative_to(PKG.resolve()), f"{path} is outside the installed package"
        assert path.exists(), path
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        assert files, path
        for f in files:
            assert f.relative_to(ROOT).as_posix() in selection["wheel"], f"{f} is loaded but not shipped"


def test_wheel_carries_only_the_package(selection):
    outside = [f for f in selection["wheel"] if not f.startswith("src/diffshield/")]
    junk = [f for f in selection["wheel"] if any(j in f for j in JUNK)]
    assert not outside and not junk, (outside, junk)


def test_sdist_has_the_documents_and_no_tests_or_outputs(selection):
    sdist = selection["sdist"]
    needed = {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "MANIFEST.in", "docs/index.md",
              "examples/protect/scene.png", "examples/protect/mask.png"}
    assert needed <= sdist, sorted(needed - sdist)
    assert selection["wheel"] <= sdist, sorted(selection["wheel"] - sdist)[:5]  # it builds the same wheel
    unwanted = [f for f in sdist if f.split("/")[0] in ("tests", "runs", "build", "demo_out", ".venv", "benchmarks")
                or any(j in f for j in JUNK)]
    assert not unwanted, sorted(unwanted)[:10]


def test_the_backdoored_example_has_a_name():
    """The shipped backdoored DDPM is reachable by name, not only by a path inside the repository."""
    from diffshield.core.loading import resolve_model_path
    from diffshield.toyworld.names import TOY_DDPMS, TOY_MODELS, TOY_ROOT

    assert resolve_model_path("toy:ddpm-box-corner") == TOY_ROOT / "ddpm" / "examples" / "box_corner"
    for name in TOY_DDPMS:
        assert name in TOY_MODELS
        index = json.loads((resolve_model_path(name) / "model_index.json").read_text())
        assert index["_class_name"] == "DDPMPipeline", name
    # the backdoor commands load it by that name; a text-to-image name is refused there in one line
    from diffshield.backdoor.ddpm import load_ddpm
    from diffshield.core.errors import DiffshieldError

    assert load_ddpm("toy:ddpm-box-corner").image_shape == (3, 32, 32)
    with pytest.raises(DiffshieldError, match="toy:ddpm-box-corner"):
        load_ddpm("toy:t2i")


def _parents_climbed(node: ast.AST, parent_of: dict[ast.AST, ast.AST]) -> int:
    """How many folders up the expression around a ``__file__`` goes (``.parent``, ``.parents[k]``,
    ``os.path.dirname``, ``/ ".."``)."""
    up = 0
    while (outer := parent_of.get(node)) is not None:
        if isinstance(outer, ast.Attribute) and outer.attr == "parent":
            up += 1
        elif isinstance(outer, ast.Subscript) and isinstance(node, ast.Attribute) and node.attr == "parents":
            k = outer.slice.value if isinstance(outer.slice, ast.Constant) else 99
            up += k + 1 if isinstance(k, int) else 99
        elif isinstance(outer, ast.Call):
            func = outer.func
            if isinstance(func, ast.Attribute) and func.attr == "dirname" and node is not func:
                up += 1
            up += sum(1 for a in outer.args if isinstance(a, ast.Constant) and a.value == "..")
        elif isinstance(outer, ast.BinOp):
            other = outer.right if outer.left is node else outer.left
            up += isinstance(other, ast.Constant) and other.value == ".."
        elif not isinstance(outer, ast.Attribute | ast.Subscript):
            break
        node = outer
    return up


def test_no_module_computes_a_path_outside_the_package():
    outside = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parent_of = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        depth = len(path.relative_to(PKG.parent).parts) - 1  # folders from the module up to diffshield/ itself
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "__file__":
                if _parents_climbed(node, parent_of) > depth:
                    outside.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not outside, f"paths computed from __file__ that leave the package: {outside}"


def test_no_run_time_path_points_into_the_repository():
    """No default and no opened path names a repository folder that a pip install does not have."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            values = [kw.value for kw in node.keywords if kw.arg == "default"]
            if name in ("Path", "PurePath", "open", "load_file", "from_pretrained") and node.args:
                values.append(node.args[0])
            for v in values:
                if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value.startswith(REPO_ONLY):
                    found.append(f"{path.relative_to(ROOT)}:{v.lineno} {v.value!r}")
    assert not found, found


def test_python_m_diffshield_runs_the_command_line(tmp_path):
    version = subprocess.run([sys.executable, "-m", "diffshield", "--version"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.split() == ["diffshield", diffshield.__version__], version
    bare = subprocess.run([sys.executable, "-m", "diffshield"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert bare.returncode == 2 and "usage: diffshield" in bare.stdout + bare.stderr, bare


@pytest.mark.slow
def test_built_wheel_runs_outside_the_repository(selection, tmp_path):
    """Build the wheel from the sdist's files (about 40 s), unpack it, and use it from another folder with the
    repository off sys.path: the toy names resolve inside it, a model loads and draws, and nothing is written
    into the installed package."""
    src = tmp_path / "src"
    for f in selection["sdist"]:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, timeout=600)
    (wheel,) = dist.glob("diffshield-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if not n.startswith("diffshield-")}
        z.extractall(site)
    assert names == {f.removeprefix("src/") for f in selection["wheel"]}
    before = sorted(p for p in site.rglob("*") if "__pycache__" not in p.parts)
    user = tmp_path / "user"
    user.mkdir()
    code = ("import sys, diffshield; from diffshield.core.registry import MODEL_NAMES; "
            "assert diffshield.__file__.startswith(sys.argv[1]), diffshield.__file__; "
            "assert all(str(MODEL_NAMES.get(n)).startswith(sys.argv[1]) for n in MODEL_NAMES.names()); "
            "from diffshield.cli.main import main; "
            "sys.exit(main(['generate', '--model', 'toy:t2i', '--prompt', 'a red triangle', '--n', '1', "
            "'--steps', '2', '--out', 'gen']))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    subprocess.run([sys.executable, "-c", code, str(site)], cwd=user, env=env, check=True, timeout=300)
    assert (user / "gen" / "grid.png").is_file()
    assert sorted(p for p in site.rglob("*") if "__pycache__" not in p.parts) == before
