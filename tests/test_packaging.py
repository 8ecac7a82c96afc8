"""The package as others get it, built and installed for real: the licence; an sdist that is the
repository and whose tests collect as the checkout's do; the abi3 manylinux wheel `make dist`
makes, and the pure-Python one a machine without a compiler makes; a client installed without a
C compiler (nor the agent's extra) that works against a real agent; an agent installed that way
that says what it lacks; and the declared dependency floors, installed exactly, serving and
calling each other.

Every install is from a fresh copy of the unpacked sdist (the repository: see
test_the_sdist_holds_every_tracked_file) into a new venv that the suite's own pip fills
(``pip --python``), from this machine's index and pip's cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version
from support.agent_workout import Rig, exercise_everything

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
SUITE_VENV = Path(sys.executable).parent.parent
NOT_SHIPPED = {".ci/run", ".gitignore"}  # CI's and git's own files, not the project's
NATIVE_EXTENSION = "vmctl_server/backends/native/_native.abi3.so"
AGENT_ONLY_MODULES = ("cffi", "prometheus_client", "cryptography", "grpc_health", "grpc_reflection")
# The oldest CPython requires-python admits: the stable-ABI wheel's interpreter tag.
OLDEST_CPYTHON = "cp" + PYPROJECT["project"]["requires-python"].removeprefix(">=").replace(".", "")
FLOORS_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmctl-tests"

# What a controller does, run by the client under test against a real agent.
CLIENT_SCRIPT = """
import json, sys
from vmctl_client import Client

address, pid = sys.argv[1], int(sys.argv[2])
with Client(address) as client:
    node = client.node_info()
    info = client.get_vma_info(pid, attrs=("all",))
    anonymous = [vma for vma in info.vmas if vma.kind == "anonymous"]
    advice = client.advise_ranges(pid, anonymous, advice="cold", cookie=info.cookie, dry_run=True)
print(json.dumps({"hostname": node.hostname, "pid": info.process.pid, "vmas": len(info.vmas),
                  "requested": advice.requested_bytes, "syscalls": advice.syscalls}))
"""


def run(command: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``command`` to its end; a failure fails the test with everything it printed."""
    result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def clean_env(**changes: str) -> dict[str, str]:
    """This environment less what would steer a build or an import; each test adds what it means."""
    env = {k: v for k, v in os.environ.items() if k not in {"VMCTL_NATIVE", "CC", "PYTHONPATH", "VIRTUAL_ENV"}}
    env.update(changes)
    return env


def without_a_compiler(venv_python: Path) -> dict[str, str]:
    """PATH is the venv alone (no gcc, no cc) and CC names a compiler that does not exist."""
    path = str(venv_python.parent)
    assert shutil.which("gcc", path=path) is None and shutil.which("cc", path=path) is None
    return clean_env(PATH=path, CC="/nonexistent/vmctl-test/cc")


def new_venv(path: Path) -> Path:
    """A venv without a pip of its own (the suite's fills it: see :func:`pip_into`); its python."""
    run([sys.executable, "-m", "venv", "--without-pip", path])
    return path / "bin" / "python"


def pip_into(python: Path, *args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "pip", "--python", python, *args], env=env or clean_env())


def find_modules(python: Path, *modules: str) -> set[str]:
    """Which of ``modules`` ``python`` can import."""
    probe = "import importlib.util, sys; print(*[m for m in sys.argv[1:] if importlib.util.find_spec(m)])"
    return set(run([python, "-c", probe, *modules], env=clean_env()).stdout.split())


def build_wheel(source: Path, out: Path, env: dict[str, str]) -> tuple[Path, str]:
    """vmctl's wheel from the tree ``source``, built with the suite's setuptools; and the build's log."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v", "-w", out, source]
    built = run(command, env=env)
    (wheel,) = out.glob("vmctl-*.whl")
    return wheel, built.stdout + built.stderr


def installed_extensions(python: Path) -> list[Path]:
    """The compiled modules of vmctl installed in ``python``'s venv."""
    return sorted(python.parent.parent.glob("lib/python*/site-packages/vmctl_server/**/*.so"))


def wheel_members(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def wheel_licence(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(f"vmctl-{VERSION}.dist-info/licenses/LICENSE").decode()


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sdist")
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT], env=clean_env())
    (archive,) = out.glob("vmctl-*.tar.gz")
    return archive


@pytest.fixture(scope="module")
def sdist_tree(sdist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    into = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(sdist) as archive:
        archive.extractall(into, filter="data")
    return into / f"vmctl-{VERSION}"


@pytest.fixture
def source(sdist_tree: Path, tmp_path: Path) -> Path:
    """A fresh copy of the repository, for a build to write into."""
    copy = tmp_path / "vmctl"
    shutil.copytree(sdist_tree, copy)
    return copy


# ---- the licence and the sdist --------------------------------------------------------------


def test_the_licence_is_apache_2_in_the_repository_and_the_sdist(sdist_tree: Path) -> None:
    """(The wheels carry it too: both wheel tests below read it back.)"""
    licence = (ROOT / "LICENSE").read_text()
    assert licence.split()[:3] == ["Apache", "License", "Version"] and "Version 2.0, January 2004" in licence
    assert "END OF TERMS AND CONDITIONS" in licence, "the whole text, not a pointer to it"
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    assert (sdist_tree / "LICENSE").read_text() == licence
    assert "License-Expression: Apache-2.0" in (sdist_tree / "PKG-INFO").read_text()


def test_the_sdist_holds_every_tracked_file(sdist: Path) -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout.splitlines()
    repository = {path for path in listed if (ROOT / path).is_file()} - NOT_SHIPPED
    with tarfile.open(sdist) as archive:
        shipped = {m.name.split("/", 1)[1] for m in archive.getmembers() if m.isfile()}
    assert repository - shipped == set(), "in the repository, missing from the sdist"
    assert not [path for path in shipped if path.endswith((".so", ".pyc"))], "built on this host"


def collected_tests(tree: Path, env: dict[str, str]) -> list[str]:
    result = run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=tree,
        env=dict(env, PYTHONDONTWRITEBYTECODE="1"),
    )
    return sorted(line for line in result.stdout.splitlines() if "::" in line)


def test_the_sdists_tests_collect_as_the_checkouts_do(source: Path) -> None:
    """Against the sdist's own code (first on the path), with its extension built in place."""
    run([sys.executable, source / "src/vmctl_server/backends/native/csrc/build.py"], env=clean_env())
    own_code = clean_env(PYTHONPATH=str(source / "src"))
    where = run([sys.executable, "-c", "import vmctl_server; print(vmctl_server.__file__)"], env=own_code).stdout
    assert Path(where.strip()).is_relative_to(source)
    in_checkout, in_sdist = collected_tests(ROOT, clean_env()), collected_tests(source, own_code)
    assert len(in_checkout) > 500
    assert in_sdist == in_checkout


# ---- wheels ----------------------------------------------------------------------------------


def test_make_dist_makes_an_abi3_manylinux_wheel(source: Path) -> None:
    """The sdist, a wheel built from it, checked by abi3audit, tagged by auditwheel (make dist),
    on the suite's venv (-o: make must not rebuild it)."""
    run(["make", "-C", source, "-o", f"{SUITE_VENV}/.installed", "dist", f"VENV={SUITE_VENV}"], env=clean_env())
    (wheel,) = (source / "dist").glob("*.whl")
    assert (source / "dist" / f"vmctl-{VERSION}.tar.gz").is_file()
    _, _, _, tags = parse_wheel_filename(wheel.name)
    manylinux = f"manylinux_2_17_{platform.machine()}"
    assert Tag(OLDEST_CPYTHON, "abi3", manylinux) in tags, tags
    assert NATIVE_EXTENSION in wheel_members(wheel)
    assert wheel_licence(wheel) == (ROOT / "LICENSE").read_text()
    shown = json.loads(run([SUITE_VENV / "bin" / "auditwheel", "show", "--json", wheel], env=clean_env()).stdout)
    assert shown["overall_tag"] == manylinux and shown["external_libs"] == {}, shown


def test_without_a_compiler_the_wheel_is_pure_python(source: Path, tmp_path: Path) -> None:
    wheel, log = build_wheel(source, tmp_path / "wheels", without_a_compiler(Path(sys.executable)))
    assert 'building extension "vmctl_server.backends.native._native" failed' in log
    assert wheel.name == f"vmctl-{VERSION}-py3-none-any.whl"
    members = wheel_members(wheel)
    assert not [name for name in members if name.endswith(".so")]
    assert not [name for name in members if ".data/" in name], "everything in purelib, nothing in platlib"
    with zipfile.ZipFile(wheel) as archive:
        assert "Root-Is-Purelib: true" in archive.read(f"vmctl-{VERSION}.dist-info/WHEEL").decode()
    assert wheel_licence(wheel) == (ROOT / "LICENSE").read_text()


# ---- installed without a compiler ------------------------------------------------------------


@pytest.fixture(scope="module")
def client_only(sdist_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install <repository>`` without a compiler and without extras: the client. Its python."""
    root = tmp_path_factory.mktemp("client-only")
    python = new_venv(root / "venv")
    shutil.copytree(sdist_tree, root / "vmctl")
    pip_into(python, "install", root / "vmctl", env=without_a_compiler(python))
    return python


def test_without_a_compiler_the_client_installs_and_works(client_only: Path, agent, target) -> None:
    env = without_a_compiler(client_only)
    vmctl = client_only.parent / "vmctl"
    assert run([vmctl, "--version"], env=env).stdout.strip() == f"vmctl {VERSION}"
    assert "reclaim" in run([vmctl, "--help"], env=env).stdout
    node = json.loads(run([vmctl, "--target", agent.address, "node", "-o", "json"], env=env).stdout)
    assert node["hostname"] == platform.node() and node["agent_version"] == VERSION
    maps = json.loads(run([vmctl, "--target", agent.address, "maps", str(target.pid), "-o", "json"], env=env).stdout)
    assert maps["process"]["pid"] == target.pid and maps["vmas"]
    # The client alone: no extension, none of the agent's dependencies.
    assert installed_extensions(client_only) == []
    assert find_modules(client_only, *AGENT_ONLY_MODULES) == set()


def test_an_agent_without_its_extra_says_what_to_install(client_only: Path, tmp_path: Path) -> None:
    agent = client_only.parent / "vmctl-agent"
    command = [agent, "--listen", f"unix://{tmp_path}/agent.sock"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, env=clean_env())
    assert result.returncode == 1, result
    assert "pip install 'vmctl[agent]'" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "agent.sock").exists()


def test_an_agent_built_without_a_compiler_refuses_unless_no_native(
    source: Path, tmp_path: Path, start_agent, target
) -> None:
    python = new_venv(tmp_path / "venv")
    env = without_a_compiler(python)
    pip_into(python, "install", f"{source}[agent]", env=env)
    assert installed_extensions(python) == []
    refused = subprocess.run(
        [python.parent / "vmctl-agent", "--listen", f"unix://{tmp_path}/agent.sock"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert refused.returncode == 1, refused
    assert "C extension is not installed" in refused.stderr and "--no-native" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "agent.sock").exists()
    agent = start_agent("--no-native", python=str(python))
    maps = run([python.parent / "vmctl", "--target", agent.address, "maps", str(target.pid), "-o", "json"], env=env)
    assert json.loads(maps.stdout)["process"]["pid"] == target.pid


# ---- the declared floors -----------------------------------------------------------------------


def declared_requirements() -> list[str]:
    """What the build, the client and the agent's extra require (the dev tools are not vmctl's to run)."""
    project = PYPROJECT["project"]
    build = PYPROJECT["build-system"]["requires"]
    return [*build, *project["dependencies"], *project["optional-dependencies"]["agent"]]


def declared_floors() -> dict[str, str]:
    """The floor (``>=``) of every requirement of the build, the client and the agent's extra, by name."""
    floors: dict[str, str] = {}
    for text in declared_requirements():
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]  # every one has one
        name = canonicalize_name(requirement.name)
        assert floors.setdefault(name, floor) == floor, f"{name}: two floors"
    return floors


@contextlib.contextmanager
def floors_venv(constraints: str) -> Iterator[tuple[Path, Path]]:
    """A venv holding exactly the floors, kept under FLOORS_CACHE by their digest (and Python's
    version) so that reruns skip the downloads; held under a lock, as other checkouts on this
    machine may use it meanwhile. Its python and the constraints file."""
    key = hashlib.sha256(f"{sys.version}\n{constraints}".encode()).hexdigest()[:16]
    venv = FLOORS_CACHE / f"floors-{key}"
    FLOORS_CACHE.mkdir(parents=True, exist_ok=True)
    with open(FLOORS_CACHE / f"floors-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        constraints_file, complete = venv.with_suffix(".txt"), venv / ".complete"
        if not complete.exists():  # absent, or left half made
            shutil.rmtree(venv, ignore_errors=True)
            constraints_file.write_text(constraints)
            python = new_venv(venv)
            pip_into(python, "install", "--constraint", constraints_file, *declared_requirements())
            complete.touch()
        yield venv / "bin" / "python", constraints_file


def installed_versions(python: Path) -> dict[str, str]:
    listed = json.loads(pip_into(python, "list", "--format", "json").stdout)
    return {canonicalize_name(p["name"]): p["version"] for p in listed}


def test_the_declared_floors_install_and_work(source: Path, tmp_path: Path, start_agent, target) -> None:
    """The floors of the client, the agent and the build, installed exactly: vmctl builds with them,
    its agent serves everything a deployment uses (the workout: every RPC, TLS, policy reload,
    reflection, health, metrics) and its client calls it."""
    floors = declared_floors()
    constraints = "".join(f"{name}=={floor}\n" for name, floor in sorted(floors.items()))
    with floors_venv(constraints) as (python, constraints_file):
        pip_into(python, "uninstall", "-y", "vmctl")  # a former run's
        pip_into(python, "install", "--no-build-isolation", "--constraint", constraints_file, f"{source}[agent]")
        pip_into(python, "check")
        installed = installed_versions(python)
        assert {name: Version(installed[name]) for name in floors} == {n: Version(f) for n, f in floors.items()}
        assert installed_extensions(python), "built with the floors' setuptools and cffi"

        rig = Rig.create(tmp_path / "rig")
        agent = start_agent(*rig.agent_args(), python=str(python))
        exercise_everything(rig, agent, agent.proc.pid, [target])
        called = run([python, "-c", CLIENT_SCRIPT, agent.address, str(target.pid)], env=clean_env()).stdout
        answer = json.loads(called)
        assert answer["hostname"] == platform.node() and answer["pid"] == target.pid and answer["syscalls"] == 0
        assert answer["requested"] > 0
        vmctl = python.parent / "vmctl"
        assert run([vmctl, "--version"], env=clean_env()).stdout.strip() == f"vmctl {VERSION}"
        assert "cookie" in run([vmctl, "--target", agent.address, "maps", str(target.pid)], env=clean_env()).stdout
