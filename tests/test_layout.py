"""The package's structure: no import cycle, and no module uses another module's private
names (the benchmark scripts included). Read from the sources with ast, so imports inside
functions count too."""
import ast
import os

import pytest

pytestmark = pytest.mark.cpu_only  # CI runs it; skipped under CK_TEST_DEVICE=cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "contrastive_kernels"


def _modules():
    """{dotted name: path} of the package's modules (triton_kernels/ is installed as
    contrastive_kernels.triton_kernels)."""
    out = {}
    for base, prefix in ((os.path.join(ROOT, PKG), PKG),
                         (os.path.join(ROOT, "triton_kernels"), PKG + ".triton_kernels")):
        for dirpath, _, files in os.walk(base):
            rel = os.path.relpath(dirpath, base)
            parts = [] if rel == "." else rel.split(os.sep)
            for f in files:
                if not f.endswith(".py"):
                    continue
                name = ".".join([prefix] + parts + ([] if f == "__init__.py" else [f[:-3]]))
                out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()
# and the compiled extension, a module without a .py file
NAMES = set(MODULES) | {PKG + "._C"}


def _resolve(mod, node):
    """The dotted module an ImportFrom refers to."""
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[mod].endswith("__init__.py")
    parts = mod.split(".")
    base = parts if is_pkg else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod):
    """[(imported module, [names imported from it])] of one module."""
    tree = ast.parse(open(MODULES[mod]).read())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((_resolve(mod, node), [a.name for a in node.names]))
    return out


def _edges(mod):
    """Package modules that `mod` imports. `from pkg import sub` counts as importing the
    submodule (the parent package is loaded first in any case)."""
    out = set()
    for target, names in _imports(mod):
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in NAMES]
        if subs:
            out.update(subs)
            if len(subs) < len(names):
                out.add(target)
        elif target in MODULES:
            out.add(target)
    out.discard(mod)
    return out


def test_no_import_cycle():
    graph = {m: _edges(m) for m in MODULES}
    graph.update({m: set() for m in NAMES - set(MODULES)})
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    # the walk sees the imports (so that it can fail): loss imports ops
    assert f"{PKG}.ops" in graph[f"{PKG}.loss"]


def _private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _violations(path, own=None):
    """Private names of package modules used in the file at `path` (own: its module)."""
    tree = ast.parse(open(path).read())
    aliases, bad = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == PKG:
                    aliases[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(own, node) if own else (node.module or "")
            if target.split(".")[0] != PKG:
                continue
            for a in node.names:
                full = f"{target}.{a.name}"
                if full in NAMES:
                    aliases[a.asname or a.name] = full
                elif _private(a.name) and target != own:
                    bad.append(f"from {target} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain, base = [], node
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases and aliases[base.id] != own:
                if any(_private(c) for c in chain):
                    bad.append(f"{base.id}." + ".".join(reversed(chain)))
    return bad


def test_no_private_names_across_modules():
    bad = {}
    for mod, path in MODULES.items():
        v = _violations(path, own=mod)
        if v:
            bad[mod] = v
    bench = os.path.join(ROOT, "bench")
    for f in sorted(os.listdir(bench)):
        if f.endswith(".py"):
            v = _violations(os.path.join(bench, f))
            if v:
                bad["bench/" + f] = v
    assert not bad, bad


def test_the_private_name_check_can_fail(tmp_path):
    p = tmp_path / "x.py"
    p.write_text("from contrastive_kernels import backends\n"
                 "from contrastive_kernels.loss import _hidden\n"
                 "backends.REGISTRY._warned\n")
    assert len(_violations(str(p))) == 2
