"""The built wheel works outside the checkout: installed (without its dependencies, which this environment
already has) into a scratch venv, `jaxalign quickstart --help` runs from another directory, and the quickstart's
recipes and assets load from the installed package. Every third-party module jaxalign imports at run time is
declared in setup.py."""
import ast
import os
import subprocess
import sys
import sysconfig
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name where they differ
DISTRIBUTIONS = {"absl": "absl-py", "orbax": "orbax-checkpoint", "tensorboardX": "tensorboardX",
                 "ml_collections": "ml_collections", "yaml": "pyyaml"}
# imported only by the optional extras, or provided by a declared dependency's own package
OPTIONAL = {"matplotlib"}


def _requirements() -> set:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            reqs = ast.literal_eval(node.value)
    return {r.split(">")[0].split("<")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}


def _runtime_imports() -> set:
    mods = set()
    for root, _, files in os.walk(os.path.join(ROOT, "jaxalign")):
        for f in files:
            if f.endswith(".py"):
                for node in ast.walk(ast.parse(open(os.path.join(root, f)).read())):
                    if isinstance(node, ast.Import):
                        mods |= {a.name.split(".")[0] for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                        mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m != "jaxalign"}


def test_every_runtime_import_is_a_declared_dependency():
    reqs = _requirements()
    missing = sorted(m for m in _runtime_imports() - OPTIONAL if DISTRIBUTIONS.get(m, m).lower() not in reqs)
    assert not missing, f"imported by jaxalign but not in install_requires: {missing}"
    # transformers renders chat templates with jinja2 but does not require it
    assert "jinja2" in reqs


def test_wheel_runs_the_quickstart_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "wheel"), ROOT],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("jaxalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "jaxalign/recipes/quickstart/sft.py" in names and "jaxalign/assets/quickstart/tokenizer.json" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The scratch venv reuses this environment's packages (a plain path entry: its .pth files, among them
    # the editable install's finder for the checkout, are not processed), after its own site-packages.
    with open(os.path.join(purelib, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = lambda *args: subprocess.run([str(py), *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    out = subprocess.run([str(venv / "bin" / "jaxalign"), "quickstart", "--help"], cwd=elsewhere, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "--run-dir" in out.stdout, out.stderr
    check = run("-c", "import os, jaxalign, jaxalign.quickstart as q\n"
                      "from jaxalign.config import load_config\n"
                      "assert not jaxalign.__file__.startswith(%r), jaxalign.__file__\n"
                      "for s in ('sft', 'rm', 'dpo', 'grpo', 'ppo'):\n"
                      "    cfg = load_config(os.path.join(q.CONFIGS, s + '.py'))\n"
                      "    assert os.path.isfile(cfg.tokenizer.path + '/tokenizer.json') or cfg.model.path\n"
                      "print(jaxalign.__file__)" % ROOT)
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(purelib)
