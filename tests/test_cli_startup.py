"""The command line starts without importing the heavy libraries it does not need.

Each check runs in a fresh interpreter and reads `sys.modules` at its end: `--help` of the
command and of every subcommand imports none of torch, MLflow, Optuna and transformers, and
`list` and `show` (which import the plugins, hence torch) import neither MLflow, transformers,
scikit-learn nor pandas. Start-up times are measured by `benchmarks/bench_cli_startup.py`, not
here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

HEAVY = ("torch", "mlflow", "optuna", "transformers")
# `list` imports the plugins, hence torch, but not what only training or data preparation needs.
NOT_FOR_LIST = ("mlflow", "transformers", "sklearn", "pandas")
SUBCOMMANDS = (
    "run",
    "list",
    "show",
    "experiment",
    "download",
    "prepare",
    "tune",
    "sweep",
    "reproduce",
    "leaderboard",
    "ui",
)


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def _loaded(names: list[str]) -> str:
    """Code printing, as JSON on the last line, which of `names` are imported."""
    return f"print(json.dumps([m for m in {names!r} if m in sys.modules]))"


def test_importing_the_command_line_imports_no_heavy_library():
    completed = _python(f"import json, sys\nimport robustbench_mat.cli\n{_loaded(list(HEAVY))}")
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[-1]) == []


def test_importing_the_package_keeps_its_public_names_and_sets_the_openmp_wait_policy():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    completed = _python(
        """
        import json, os, sys
        import robustbench_mat
        policy = os.environ.get("OMP_WAIT_POLICY")
        before = [m for m in ("torch", "optuna") if m in sys.modules]
        public = robustbench_mat.__all__
        names = {name: getattr(robustbench_mat, name).__module__ for name in public}
        print(json.dumps([policy, before, names]))
        """,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    policy, before, names = json.loads(completed.stdout.splitlines()[-1])
    assert policy == "PASSIVE"
    assert before == []
    assert names == {
        "Batch": "robustbench_mat.method",
        "BenchmarkDataset": "robustbench_mat.data",
        "EvalGroups": "robustbench_mat.data",
        "HParam": "robustbench_mat.hparams",
        "Method": "robustbench_mat.method",
        "SplitArrays": "robustbench_mat.data",
        "register_dataset": "robustbench_mat.registry",
        "register_method": "robustbench_mat.registry",
    }


def test_help_of_the_command_and_of_every_subcommand_imports_no_heavy_library():
    completed = _python(
        f"""
        import contextlib, io, json, sys
        from robustbench_mat.cli import main

        results = {{}}
        for command in [[]] + [[name] for name in {list(SUBCOMMANDS)!r}]:
            out = io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    code = main(command + ["--help"])
            except SystemExit as exit:
                code = exit.code
            heavy = [m for m in {list(HEAVY)!r} if m in sys.modules]
            results[" ".join(command) or "(none)"] = [code, heavy, "usage:" in out.getvalue()]
        print(json.dumps(results))
        """
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.splitlines()[-1])
    assert results == {name: [0, [], True] for name in ("(none)", *SUBCOMMANDS)}


def test_list_shows_built_in_and_entry_point_plugins_without_training_libraries(
    tmp_path: Path,
):
    site = tmp_path / "site"
    (site / "demo_startup_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "demo_startup_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: demo-startup-plugin\nVersion: 1.0\n"
    )
    (site / "demo_startup_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[robustbench_mat.methods]\necho = demo_startup_plugin:Echo\n"
    )
    (site / "demo_startup_plugin.py").write_text(
        'class Echo:\n    """Echo: a method from another package."""\n'
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), *sys.path])))
    completed = _python(
        f"""
        import json, sys
        from robustbench_mat.cli import main

        code = main(["list"])
        print(json.dumps([code, [m for m in {list(NOT_FOR_LIST)!r} if m in sys.modules]]))
        """,
        env=env,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    code, heavy = json.loads(lines[-1])
    assert (code, heavy) == (0, [])
    listing = "\n".join(lines[:-1])
    rows = {line.split()[0]: line for line in listing.splitlines() if line.strip()}
    assert "built-in" in rows["erm"] and "built-in" in rows["synthetic"]
    assert "Echo: a method from another package." in rows["echo"]
    assert rows["echo"].rstrip().endswith("package demo-startup-plugin 1.0")


def test_show_imports_no_training_library_and_loads_no_backbone():
    completed = _python(
        f"""
        import json, sys
        from robustbench_mat.cli import main

        codes = [main(["show", "mat", "--dataset", "civilcomments"]), main(["show", "waterbirds"])]
        print(json.dumps([codes, [m for m in {list(NOT_FOR_LIST)!r} if m in sys.modules]]))
        """
    )
    assert completed.returncode == 0, completed.stderr
    codes, heavy = json.loads(completed.stdout.splitlines()[-1])
    assert (codes, heavy) == ([0, 0], [])
    assert "Settings on civilcomments" in completed.stdout


def _demo_site(site: Path, docstring: str) -> Path:
    """A package `demo_cached_plugin` 1.0 with one method, `echo`, described by `docstring`."""
    info = site / "demo_cached_plugin-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: demo-cached-plugin\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(
        "[robustbench_mat.methods]\necho = demo_cached_plugin:Echo\n"
    )
    module = site / "demo_cached_plugin.py"
    module.write_text(f'class Echo:\n    """{docstring}"""\n')
    return module


def test_list_reads_a_kept_listing_until_a_plugin_changes(tmp_path: Path):
    """The first `list` imports the plugins and keeps its rows; the next one prints the same
    rows without importing torch; editing a plugin's file lists it afresh."""
    module = _demo_site(tmp_path / "site", "Echo: first words.")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "site"), *sys.path])),
        ROBUSTBENCH_MAT_CACHE_DIR=str(tmp_path / "cache"),
    )
    code = """
        import contextlib, io, json, sys
        from robustbench_mat.cli import main

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            main(["list"])
        print(json.dumps([out.getvalue(), "torch" in sys.modules]))
        """

    def listing() -> tuple[str, bool]:
        completed = _python(code, env=env)
        assert completed.returncode == 0, completed.stderr
        return tuple(json.loads(completed.stdout.splitlines()[-1]))

    first, imported = listing()
    assert imported and "Echo: first words." in first and (tmp_path / "cache").is_dir()
    assert listing() == (first, False)
    module.write_text('class Echo:\n    """Echo: other words, same length."""\n')
    os.utime(module, ns=(module.stat().st_mtime_ns + 10**9,) * 2)
    changed, imported = listing()
    assert imported and "Echo: other words, same length." in changed
    assert listing() == (changed, False)


def test_a_plugin_that_fails_to_load_is_reported_at_every_list(tmp_path: Path):
    module = _demo_site(tmp_path / "site", "unused")
    module.write_text("raise RuntimeError('broken on purpose')\n")
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "site"), *sys.path])),
        ROBUSTBENCH_MAT_CACHE_DIR=str(tmp_path / "cache"),
    )
    for _ in range(2):
        completed = _python("from robustbench_mat.cli import main\nmain(['list'])", env=env)
        assert completed.returncode == 0, completed.stderr
        assert "could not load method plugin 'echo'" in completed.stderr
        assert "broken on purpose" in completed.stderr
        assert "erm" in completed.stdout
