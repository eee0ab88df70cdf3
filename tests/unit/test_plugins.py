"""The config's `imports:` (regularizer plugins): loading by module name and by .py path, the
same module imported twice, the one-line errors (unknown module, duplicate type name) through
the real `tti` entry point, a pickled config importing its plugins in a fresh interpreter,
and `tti submit`'s check that a plugin file is shipped with the working directory.

The plugin modules live in tests/plugins, a plain directory outside the package.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tti_dist.cli import main as tti_main
from tti_dist.config import config_to_dict, load_config
from tti_dist.config.load import config_from_dict
from tti_dist.config.plugins import plugin_search_paths
from tti_dist.errors import ConfigError
from tti_dist.orchestrate.jobs import prepare_submission

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "tests" / "plugins"
EXAMPLE = PLUGINS / "tti_plugin_example.py"
ENTRY = {"type": "weight_lp", "name": "wlp", "coefficient": 0.1, "layers": ["blocks.*.mlp.fc1"], "p": 1.5}


def _write(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_path_import_relative_to_the_config_file_and_recorded_absolute(tmp_path, monkeypatch):
    # The config lies in tmp_path and the cwd elsewhere: the path is resolved from the config's directory.
    config = _write(tmp_path / "run.yaml", {"imports": [os.path.relpath(EXAMPLE, tmp_path)], "regularizers": [ENTRY]})
    monkeypatch.chdir("/")
    cfg = load_config(config)
    assert cfg.imports == (str(EXAMPLE),)
    reg = cfg.regularizers[0]
    assert type(reg.params).__module__ == "tti_plugin_example"
    assert (reg.type, reg.params.layers, reg.params.p) == ("weight_lp", ("blocks.*.mlp.fc1",), 1.5)
    # RUN/config.yaml holds the absolute path; reading it back (from anywhere) gives the same config.
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))
    assert again == cfg


def test_the_same_module_twice_is_not_a_duplicate(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    by_path = config_from_dict({"imports": [str(EXAMPLE)], "regularizers": [ENTRY]})
    by_path_again = config_from_dict({"imports": [str(EXAMPLE), str(EXAMPLE)], "regularizers": [ENTRY]})
    by_name = config_from_dict({"imports": ["tti_plugin_example"], "regularizers": [ENTRY]})
    assert by_path_again.imports == (str(EXAMPLE),)  # listed twice: imported once
    # One module object, whichever way it was named: its types were registered once.
    assert type(by_path.regularizers[0].params) is type(by_name.regularizers[0].params)
    assert sys.modules["tti_plugin_example"].__file__ == str(EXAMPLE)


def test_a_file_whose_stem_names_another_loaded_module_is_refused(tmp_path):
    other = tmp_path / "json.py"
    other.write_text("")
    with pytest.raises(ConfigError) as err:
        config_from_dict({"imports": [str(other)]})
    assert str(err.value).startswith(f"imports[0]: '{other}' would be imported as module 'json', but a module 'json' "
                                     "is loaded already (from ")


@pytest.mark.parametrize("imports, message", [
    ("not a list", "imports[0]: 'not a list' is not a module name (dotted identifiers, e.g. my_pkg.regs) or a path "
                   "to a .py file"),
    ([3], "imports[0]: 3 must be a module name (my_pkg.regs) or a path to a .py file"),
    ({"a": 1}, "imports: expected a list of module names or .py files, got {'a': 1}"),
    (["/nonexistent/tti_plugin_x.py"], "imports[0]: '/nonexistent/tti_plugin_x.py' does not exist or is not a file"),
])
def test_bad_entries(imports, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"imports": imports})
    assert str(err.value) == message


def _tti(args, capsys):
    code = tti_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def test_unknown_module_is_exit_2_naming_imports(tmp_path, capsys):
    config = _write(tmp_path / "run.yaml", {"imports": ["tti_no_such_plugin"], "regularizers": [ENTRY]})
    code, err = _tti(["train", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err == ["tti: error: imports[0]: cannot import 'tti_no_such_plugin': ModuleNotFoundError: "
                   "No module named 'tti_no_such_plugin'"]
    assert not (tmp_path / "run").exists()


def test_duplicate_type_name_is_exit_2_naming_the_first_registrant(tmp_path, capsys):
    duplicate = PLUGINS / "tti_plugin_duplicate.py"
    config = _write(tmp_path / "run.yaml", {"imports": [str(duplicate)]})
    code, err = _tti(["train", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    assert code == 2
    assert err == [f"tti: error: imports[0]: cannot import '{duplicate}' (as module 'tti_plugin_duplicate'): "
                   "ValueError: regularizer config type 'l1' is already registered by "
                   "tti_dist.config.regularizers.L1Config; cannot register tti_plugin_duplicate.AnotherL1Config "
                   "under it too"]
    assert "tti_plugin_duplicate" not in sys.modules  # a failed import leaves no half module behind


def test_the_plugin_types_are_among_the_known_ones():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"imports": [str(EXAMPLE)], "regularizers": [{**ENTRY, "type": "weight_lq"}]})
    assert str(err.value).startswith("regularizers[0].type: 'weight_lq' is not a known regularizer; choose one of ")
    choices, hint = str(err.value).split("choose one of ", 1)[1].split(" (", 1)
    assert "weight_lp" in choices.split(", ") and hint == "a type of your own: name its module under `imports:`)"


def test_unpickling_a_config_imports_its_plugins_first():
    """A spawned rank or a Ray worker gets the config pickled, in an interpreter that has
    not imported the plugin (and whose sys.path does not hold its directory)."""
    cfg = config_from_dict({"imports": [str(EXAMPLE)], "regularizers": [ENTRY]})
    code = ("import pickle, sys\n"
            "assert 'tti_plugin_example' not in sys.modules\n"
            "cfg = pickle.loads(sys.stdin.buffer.read())\n"
            "from tti_dist.regularizers.base import REGISTRY\n"
            "print(type(cfg.regularizers[0].params).__name__, REGISTRY['weight_lp'].__module__, cfg.imports)\n")
    proc = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(cfg), capture_output=True, cwd="/",
                          timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    assert proc.stdout.decode().split() == ["WeightLpConfig", "tti_plugin_example", f"('{EXAMPLE}',)"]


def test_submit_refuses_a_plugin_file_outside_the_working_directory(tmp_path):
    config = _write(tmp_path / "run.yaml", {"imports": [str(EXAMPLE)], "regularizers": [ENTRY]})
    with pytest.raises(ConfigError) as err:
        prepare_submission(config, working_dir=tmp_path)
    assert str(err.value) == (f"imports: '{EXAMPLE}' is outside the working directory '{tmp_path}' that is shipped "
                              "to the cluster; move it inside or pass --working-dir")


def test_search_paths_passed_to_ray_workers(monkeypatch):
    """`tti sweep` on the embedded Ray passes the directories its plugin modules were found in
    to the workers' PYTHONPATH (a module found through the working directory, which
    `python -m` puts on sys.path, is not on a Ray worker's path); installed packages and .py
    entries (imported by path) need none."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    config_from_dict({"imports": ["tti_plugin_example"]})
    assert plugin_search_paths(("tti_plugin_example", "yaml", str(EXAMPLE))) == [str(PLUGINS)]
    assert plugin_search_paths(("tti_dist.regularizers.l1",)) == [str(ROOT)]  # a package: the directory holding it


def test_settings_without_a_regularizer_class_is_a_one_line_error(tmp_path, capsys):
    from tti_dist.config.regularizers import CONFIG_TYPES

    config = _write(tmp_path / "run.yaml", {
        "imports": [str(PLUGINS / "tti_plugin_settings_only.py")],
        "regularizers": [{"type": "settings_only", "name": "s", "coefficient": 1.0}]})
    try:
        code, err = _tti(["train", str(config), "--run-dir", str(tmp_path / "run")], capsys)
    finally:  # the half-registered type must not leak into later tests of this process
        CONFIG_TYPES.pop("settings_only", None)
        sys.modules.pop("tti_plugin_settings_only", None)
    assert code == 2 and len(err) == 1
    assert err[0].startswith("tti: error: regularizers[0].type: 'settings_only' has settings but no registered "
                             "Regularizer class (@register); registered types: ")
    assert not (tmp_path / "run").exists()
