"""The import graph of `worker` and `producers`: no cycles, no module importing from a layer above its own, and
production code never importing the sandbox or the local stack (docs/ARCHITECTURE.md, "What may import what").

Every import counts, including those inside functions and under TYPE_CHECKING: a cycle hidden in a function is
still a cycle for a reader, and the first caller to hoist the import would meet it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "producers")

# Lowest first. A module may import modules of its own layer and of the layers before it, never after.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "base",
        (
            "worker.settings",
            "worker.phones",
            "worker.logs",
            "worker.signing",
            "worker.pause",
            "worker.faults",
            "worker.secrets_box",
            "worker.webhooks.signature",
        ),
    ),
    (
        "records and provider",
        (
            "worker.ledger",
            "worker.accounts",
            "worker.attempts",
            "worker.events",
            "worker.webhooks.store",
            "worker.migrations",
            "worker.guard",
            "worker.guard_ledger",
            "worker.upesipay",
            "worker.scoring",
            "worker.reprompts",
        ),
    ),
    ("runtime", ("worker.runtime",)),
    (
        "payment flow",
        (
            "worker.celery_app",
            "worker.schedule",
            "worker.tasks",
            "worker.sending",
            "worker.dispatch",
            "worker.batch_brake",
            "worker.bulk_turns",
            "worker.settlement",
            "worker.ambiguous",
            "worker.other_channels",
            "worker.provider_blocks",
            "worker.retry",
            "worker.in_progress",
            "worker.provider_callback",
            "worker.reconcile",
            "worker.metrics",
            "worker.webhooks",
            "worker.batch_events",
            "worker.bulk_order",
            "worker.forecast",
        ),
    ),
    ("producers", ("producers",)),
    ("web", ("worker.web",)),
    ("tools", ("worker.cli", "worker.local", "worker")),
)
# The sandbox is a product of its own: it may use the phone-number rules and nothing else of stkpush.
SANDBOX = "worker.sandbox"
SANDBOX_MAY_IMPORT = ("worker.phones",)
# Only these may start the sandbox or the local stack.
TOOLS = ("worker.cli", "worker.local")


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def module_names(root: Path = ROOT) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            elif parts[-1] == "__main__":
                continue
            names[".".join(parts)] = path
    return names


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports. `from a import b` is an edge to `a.b` when that is a module."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    targets.add(submodule if submodule in modules else node.module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def layer_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, layer): the longest prefix decides
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if _within(module, prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def forbidden_imports(graph: Mapping[str, Iterable[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if _within(module, SANDBOX):
                if not _within(target, SANDBOX) and target not in SANDBOX_MAY_IMPORT:
                    problems.append(
                        f"{module} -> {target}: the sandbox imports nothing of stkpush but phones"
                    )
                continue
            if _within(target, SANDBOX) or any(_within(target, tool) for tool in TOOLS):
                if not any(_within(module, tool) for tool in TOOLS):
                    problems.append(
                        f"{module} -> {target}: production code never imports the sandbox or stack"
                    )
                continue
            source_layer, target_layer = layer_of(module), layer_of(target)
            if source_layer is None or target_layer is None:
                problems.append(
                    f"{module} -> {target}: module not placed in a layer (tests/unit/test_layers.py)"
                )
            elif target_layer > source_layer:
                problems.append(
                    f"{module} -> {target}: '{LAYERS[source_layer][0]}' imports from the higher layer "
                    f"'{LAYERS[target_layer][0]}'"
                )
    return problems


def test_the_project_has_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_no_module_imports_from_a_higher_layer_or_the_sandbox() -> None:
    assert forbidden_imports(import_graph()) == []


def test_every_module_is_placed_in_a_layer() -> None:
    unplaced = [m for m in import_graph() if layer_of(m) is None and not _within(m, SANDBOX)]
    assert unplaced == []


def test_the_graph_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    # Given a tree whose only imports are hidden in a function and under TYPE_CHECKING
    (tmp_path / "worker").mkdir()
    (tmp_path / "producers").mkdir()
    (tmp_path / "worker" / "__init__.py").write_text("")
    (tmp_path / "producers" / "__init__.py").write_text("")
    (tmp_path / "worker" / "ledger.py").write_text("def f():\n    from worker.web import app\n")
    (tmp_path / "worker" / "web.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from worker import ledger\n"
    )
    # When the graph is built, Then both edges are there, and they make a cycle
    graph = import_graph(tmp_path)
    assert graph["worker.ledger"] == {"worker.web"}
    assert graph["worker.web"] == {"worker.ledger"}
    assert find_cycle(graph) == ["worker.ledger", "worker.web", "worker.ledger"]


@pytest.mark.parametrize(
    ("edge", "complaint"),
    [
        (("worker.ledger", "worker.sending"), "higher layer 'payment flow'"),
        (("worker.settlement", "producers.enqueue"), "higher layer 'producers'"),
        (("producers.enqueue", "worker.web.access"), "higher layer 'web'"),
        (("worker.sending", "worker.sandbox.app"), "never imports the sandbox"),
        (("worker.web.app", "worker.local.stack"), "never imports the sandbox or stack"),
        (("worker.sandbox.provider", "worker.ledger"), "the sandbox imports nothing"),
    ],
)
def test_a_forbidden_import_is_reported(edge: tuple[str, str], complaint: str) -> None:
    # Given the real graph with one bad edge added
    graph = import_graph()
    source, target = edge
    graph.setdefault(source, set()).add(target)
    # Then the check names it
    problems = forbidden_imports(graph)
    assert any(problem.startswith(f"{source} -> {target}") and complaint in problem for problem in problems)


def test_an_added_cycle_is_reported() -> None:
    graph = import_graph()
    graph["worker.ledger"].add("worker.settlement")  # settlement already depends on the ledger
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "worker.settlement" in cycle


def test_the_cli_and_the_stack_may_start_the_sandbox() -> None:
    graph = {"worker.cli.main": {"worker.sandbox.cli"}, "worker.local.stack": {"worker.sandbox.scenario"}}
    assert forbidden_imports(graph) == []
