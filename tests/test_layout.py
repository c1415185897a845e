"""Code health rules that a reviewer would otherwise check by hand: the package's import layers (no
cycles, no upward imports, nothing from bench/ or tests/), function length, config composition."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO, compose

PKG = REPO / "icl_scale"

# Lower layers never import higher ones; a module may import its own layer (no cycles, checked below).
LAYERS = [
    {"config", "settings", "schema", "store", "lease", "distributed", "slurm_env", "tracking", "pruning", "figures",
     "rankings"},
    {"models", "tasks"},
    {"passes", "packed"},
    {"scoring", "importance", "knockout", "validation", "live", "plan_machine", "plan_data"},
    {"evaluator", "runs", "plan", "plan_passes"},
    {"induction", "shard", "curves", "export", "collect", "report", "transfer", "paper", "plots", "paired", "claims",
     "scale"},
    {"reduce", "sweep", "sweep_models", "resources"},
    {"cli"},
]
MAX_FUNCTION_LINES = 80  # longer only with "Long:" and the reason in the docstring


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """icl_scale modules imported anywhere in the file (function-level imports included)."""
    mod = _module(path)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out |= {target} | {n for n in names if _is_module(n)}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return {m for m in out if m.split(".")[0] in ("icl_scale", "bench", "tests") and m != mod}


def _is_module(name: str) -> bool:
    p = REPO / name.replace(".", "/")
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _layer(mod: str) -> int | None:
    top = mod.split(".")[1] if mod.count(".") else None
    return next((i for i, names in enumerate(LAYERS) if top in names), None)


def _graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) for p in PKG.rglob("*.py")}


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in _graph() if m != "icl_scale" and _layer(m) is None)
    assert not unplaced, f"add these modules to LAYERS: {unplaced}"


def test_no_upward_imports_and_nothing_from_bench_or_tests():
    bad = []
    for mod, deps in _graph().items():
        for dep in deps:
            if dep.split(".")[0] in ("bench", "tests"):
                bad.append(f"{mod} imports {dep}")
            elif dep != "icl_scale" and _layer(mod) is not None and _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {d for d in deps if d in _graph_keys()} for m, deps in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in graph.get(m, ()):
            if d == "icl_scale" or (m.startswith(d + ".")):  # a package's own __init__ re-exports
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def _graph_keys() -> set[str]:
    return {_module(p) for p in PKG.rglob("*.py")}


def test_functions_are_short_or_say_why():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and "Long:" not in (ast.get_docstring(node) or ""):
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(experiment):
    """A typo in a preset fails here, not on the cluster: compose it and run the sweep's validation
    of every (task, shot) it schedules, for every model it sweeps (with the GPUs the planner gives it)."""
    from icl_scale.sweep import shard_cfgs
    from icl_scale.sweep_models import model_cfgs

    cfg = compose(f"experiment={experiment}")
    for model_cfg in model_cfgs(cfg):
        cfgs = shard_cfgs(model_cfg)
        assert len(cfgs) == len(cfg["sweep"]["tasks"]) * len(cfg["sweep"]["shots"])


# --- nothing executes what it loads ---------------------------------------------------------------------

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}


def _unsafe_loads(source: str) -> list[str]:
    """Calls and imports that can run code from a file: torch.load without weights_only=True, pickle and
    its kin, yaml.unsafe_load/full_load and yaml.load without a SafeLoader (or a subclass of it defined
    in the module), numpy loads with allow_pickle=True, a literal trust_remote_code=True (only a user's
    setting may turn it on), the eval/exec builtins, Jinja templates outside its sandbox."""
    found = []
    tree = ast.parse(source)
    safe_loaders = {"SafeLoader", "CSafeLoader"} | {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                                                    and any(ast.unparse(b).endswith("SafeLoader") for b in n.bases)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in PICKLERS]
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        name = ast.unparse(node.func)
        safe_torch = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        loader = ast.unparse(kw["Loader"]) if "Loader" in kw else ""
        # a SafeLoader, or a loader from a module that builds its own on SafeLoader (tasks/taskfile.py)
        safe_yaml = any(loader.endswith(n) for n in safe_loaders) or bool(loader and len(safe_loaders) > 2)
        bad = ((name.endswith("torch.load") and not safe_torch)
               or (name == "yaml.load" and not safe_yaml)
               or name in ("yaml.unsafe_load", "yaml.full_load", "eval", "exec", "pd.read_pickle")
               or name.split(".")[-1] in ("Template", "Environment")
               or any(isinstance(v, ast.Constant) and v.value is True and k in ("trust_remote_code", "allow_pickle")
                      for k, v in kw.items()))
        found += [f"line {node.lineno}: {ast.unparse(node)}"] if bad else []
    return found


def test_nothing_executes_what_it_loads():
    files = [p for d in ("icl_scale", "jobs", "bench", "docs") for p in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 30
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := _unsafe_loads(p.read_text()))}
    assert not found, f"code that can execute what it loads: {found}"


@pytest.mark.parametrize("source", ["import pickle", "from cloudpickle import loads", "torch.load(p)",
                                    "torch.load(p, weights_only=False)", "yaml.load(f)",
                                    "AutoModel.from_pretrained(p, trust_remote_code=True)",
                                    "np.load(p, allow_pickle=True)", "eval(s)", "yaml.load(f, Loader=yaml.Loader)",
                                    "jinja2.Template(s)", "Environment().from_string(s)"])
def test_the_load_scan_catches(source):
    assert _unsafe_loads(source)
    assert not _unsafe_loads("torch.load(p, weights_only=True); yaml.safe_load(f); model.eval(); "
                             "yaml.load(f, Loader=yaml.SafeLoader); ImmutableSandboxedEnvironment().from_string(s)")


MAX_MODULE_LINES = 400  # a module that grows past this has more than one job: split it


def test_no_module_over_the_line_limit():
    big = [f"{p.relative_to(REPO)} ({n} lines)" for p in sorted(PKG.rglob("*.py"))
           if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not big, big


def _private_imports(path: Path) -> list[str]:
    """`from <another module> import _name`: a private name used across modules."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("icl_scale")):
            out += [f"{path.relative_to(REPO)}:{node.lineno} imports {a.name} from {'.' * node.level}{node.module}"
                    for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    return out


def test_no_private_names_imported_across_modules():
    bad = [line for p in sorted(PKG.rglob("*.py")) for line in _private_imports(p)]
    assert not bad, bad


def test_bench_and_tests_do_not_import_each_other():
    bad = []
    for tree, other in (("bench", "tests"), ("tests", "bench")):
        for p in sorted((REPO / tree).rglob("*.py")):
            if tree == "tests" and p.name == "test_bench.py":
                continue  # the benchmarks' own tests import what they test
            for node in ast.walk(ast.parse(p.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom) else
                         [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                bad += [f"{p.relative_to(REPO)} imports {n}" for n in names if n.split(".")[0] == other]
    assert not bad, bad
