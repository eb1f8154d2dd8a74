"""`pip install .` alone, without the Makefile: the installed package (not this checkout) runs
`make-tiny-model`, loads its settings' defaults and runs the interop kit's model scenarios.

The venv is clean (no system site-packages, no pip of its own) and sees this project's
dependencies through a .pth file naming a folder of links to the shared venv's packages, minus
dashscope (which the Makefile used to install on the side) and minus this project; pip (the
running one, `--python`) builds and installs the project offline, `--no-deps`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LEFT_OUT = ("dashscope", "__editable__", "fhir_rerank_adapter", "adapter")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    base = tmp_path_factory.mktemp("pip-install")
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False).create(env_dir)
    python = env_dir / "bin" / "python"
    shared = Path(sysconfig.get_paths()["purelib"])  # the test run's own venv
    deps = base / "deps"
    deps.mkdir()
    for entry in shared.iterdir():
        if not entry.name.startswith(LEFT_OUT) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(f"{deps}\n")
    src = base / "src"  # a copy: the build writes build/ and *.egg-info next to the sources
    src.mkdir()
    subprocess.run(["cp", "-a", "--", str(ROOT / "pyproject.toml"), str(ROOT / "README.md"),
                    str(ROOT / "adapter"), str(ROOT / "config"), str(src)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)
           and not k.startswith("FHIR_RERANK_")}
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                           "--no-deps", "--no-build-isolation", "--no-index", str(src)],
                          cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return env_dir, env


def _run(installed, *args, timeout=300, cwd=None):
    env_dir, env = installed
    return subprocess.run([str(env_dir / "bin" / "fhir-rerank"), *args], cwd=cwd or env_dir,
                          env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_the_installed_package_is_not_this_checkout_and_has_no_dashscope(installed):
    env_dir, env = installed
    probe = subprocess.run([str(env_dir / "bin" / "python"), "-c",
                            "import importlib.util as u, adapter; print(adapter.__file__); "
                            "print(u.find_spec('dashscope'))"],
                           cwd=env_dir, env=env, capture_output=True, text=True, timeout=60)
    where, dashscope = probe.stdout.split()
    assert where.startswith(str(env_dir)) and dashscope == "None", probe.stdout + probe.stderr


@pytest.mark.slow
def test_make_tiny_model_works_after_pip_install(installed, tmp_path):
    done = _run(installed, "make-tiny-model", str(tmp_path / "tiny"))
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["vocab_size"] == 151669
    tokenizer = json.loads((tmp_path / "tiny" / "tokenizer.json").read_text())
    assert tokenizer["model"]["vocab"]["yes"] == 9693 and tokenizer["model"]["vocab"]["no"] == 2152


@pytest.mark.slow
def test_the_interop_kit_runs_its_model_scenarios_after_pip_install(installed, fhir, tmp_path):
    report = tmp_path / "interop.json"
    done = _run(installed, "interop", "--fhir-base-url", fhir.base_url, "--json", str(report),
                timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    statuses = {s["name"]: s["status"] for s in json.loads(report.read_text())["scenarios"]}
    assert statuses["model-rerank"] == "pass" and statuses["long-note-whole"] == "pass"
