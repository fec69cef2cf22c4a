"""README's benchmark table is what scripts/bench_table.py makes of bench/results/, and every
committed result has a command that writes it."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def _bench_table() -> ModuleType:
    path = ROOT / "scripts" / "bench_table.py"
    spec = importlib.util.spec_from_file_location("bench_table", path)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_table_is_generated_from_the_results() -> None:
    bt = _bench_table()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert bt.splice(text, bt.render()) == text, "run: python scripts/bench_table.py"


def test_every_committed_result_has_a_command() -> None:
    bt = _bench_table()
    tracked = subprocess.run(["git", "ls-files", "bench/results"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    names = {Path(p).name for p in tracked}
    assert names, "bench/results/ holds no committed file"
    assert names <= set(bt.SOURCES), f"no command writes {sorted(names - set(bt.SOURCES))}"
    for name in names:
        module = bt.SOURCES[name].split()[2]  # python -m MODULE ...
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), (name, module)
