"""The package's imports point one way: from the entry points down to the engine, with no circle.

Every import counts, the ones inside functions included (a deferred import is how a circle
hides). The layers, top to bottom: a module may import only from its own layer or below.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'cnnlab')

# Top (0) to bottom. Within a layer, modules may import each other as long as no circle forms.
LAYERS = [
    ['cnnlab.cli', 'cnnlab'],
    ['cnnlab.sweeps', 'cnnlab.predict', 'cnnlab.embed', 'cnnlab.explain_cli',
     'cnnlab.pretrained_cli'],
    ['cnnlab.inference', 'cnnlab.pretrained'],
    ['cnnlab.train'],
    ['cnnlab.parallel', 'cnnlab.config', 'cnnlab.configs', 'cnnlab.analysis', 'cnnlab.explain'],
    ['cnnlab.models', 'cnnlab.tasks'],
    ['cnnlab.layers', 'cnnlab.data', 'cnnlab.ops'],
    ['cnnlab.geometry', 'cnnlab.platforms', 'cnnlab.workdir', 'cnnlab.runs'],
]


def module_files():
  """{dotted name: path} of every module of the package."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(folder, name)
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: the cnnlab modules it imports}. `from package import name` counts as importing the
  submodule `name` when there is one, else the package."""
  modules = module_files()
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1]
                          + ([base] if base else []))
        for alias in node.names:
          sub = f'{base}.{alias.name}'
          targets.add(sub if sub in modules else base)
    graph[name] = {t for t in targets if t in modules and t != name}
  return graph


def layer_of(module: str) -> int:
  best = None
  for index, prefixes in enumerate(LAYERS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + '.'):
        if best is None or len(prefix) > best[1]:
          best = (index, len(prefix))
  if best is None:
    raise AssertionError(f'{module} is in no layer of tests/test_imports.py: place it')
  return best[0]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_package_has_no_import_circle():
  assert cycles(import_graph()) == []


def test_imports_point_down_the_layers():
  graph = import_graph()
  upward = [f'{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})'
            for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) < layer_of(a)]
  assert upward == []


def test_the_walk_finds_a_circle_and_an_upward_import():
  graph = {'cnnlab.a': {'cnnlab.b'}, 'cnnlab.b': {'cnnlab.c'}, 'cnnlab.c': {'cnnlab.a'},
           'cnnlab.d': set()}
  assert cycles(graph) == [['cnnlab.a', 'cnnlab.b', 'cnnlab.c']]
  assert layer_of('cnnlab.workdir') > layer_of('cnnlab.train.loop') > layer_of('cnnlab.cli')
  with pytest.raises(AssertionError, match='no layer'):
    layer_of('elsewhere.module')


def test_workdir_and_sweep_planning_do_not_import_jax():
  """The run-directory module and sweep planning are read by processes that must not hold
  devices (the sweep runner): they may not import JAX, even deferred."""
  for module in ('cnnlab/workdir.py', 'cnnlab/runs.py', 'cnnlab/sweeps/plan.py',
                 'cnnlab/sweeps/runner.py', 'cnnlab/sweeps/__init__.py'):
    tree = ast.parse(open(os.path.join(ROOT, module), encoding='utf-8').read())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split('.')[0] in ('jax', 'flax', 'orbax')}, module
