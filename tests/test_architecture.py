"""The layering, checked on the source: math modules know nothing of Ray, DeepSpeed or the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "lga_dist"
# Modules that hold the method's math: they must run in any process, sharded or not, without the CLI.
MATH = ("lga", "editing", "evaluation", "io", "models", "answers", "validation/golden", "devices", "errors",
        "resampling")



def imports(path: Path) -> list[str]:
    """Every module an import statement in ``path`` names (``from a import b`` gives a and a.b)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def is_math(parts: tuple[str, ...]) -> bool:
    return parts[0] in MATH or "/".join(parts) in MATH


def modules() -> list[tuple[tuple[str, ...], Path]]:
    return [(path.relative_to(PACKAGE).with_suffix("").parts, path) for path in sorted(PACKAGE.rglob("*.py"))]


def test_math_modules_never_import_ray_deepspeed_or_the_cli():
    found = [(str(path.relative_to(REPO)), name) for parts, path in modules() if is_math(parts)
             for name in imports(path) if name.split(".")[0] in ("ray", "deepspeed", "jobs")
             or name.startswith(("lga_dist.commands", "lga_dist.cli", "lga_dist.distributed"))]
    assert found == [], found


def test_math_modules_never_read_deepspeeds_parameter_attributes():
    """ZeRO-3 keeps a rank's partition in ``param.ds_tensor`` (and ds_numel, ds_shape...): only the distributed
    package may know that; the math runs on whatever tensors an edit context hands it."""
    found = [(str(path.relative_to(REPO)), node.lineno, node.attr) for parts, path in modules() if is_math(parts)
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr.startswith("ds_")]
    found += [(str(path.relative_to(REPO)), node.lineno, node.value) for parts, path in modules() if is_math(parts)
              for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("ds_")]
    assert found == [], found


def test_nothing_below_the_commands_imports_a_command_and_nothing_imports_jobs():
    found = [(str(path.relative_to(REPO)), name) for parts, path in modules() if parts[0] not in ("commands", "cli")
             for name in imports(path) if name.startswith("lga_dist.commands") or name.split(".")[0] == "jobs"]
    assert found == [], found


def test_commands_do_not_import_each_other():
    calls = set()
    for parts, path in modules():
        if parts[0] == "commands" and parts[-1] != "__init__":
            for name in imports(path):
                if name.startswith("lga_dist.commands.") and name.split(".")[2] != parts[-1]:
                    calls.add((parts[-1], name.split(".")[2]))
    assert calls == set(), f"commands call each other; move the shared work into lga_dist/workflows/: {calls}"


# Heavy or optional packages a module may import where it uses them (the modules that own them).
LAZY_IMPORTS_ALLOWED = ("ray", "deepspeed", "matplotlib", "datasets")


def test_imports_sit_at_module_top_except_the_heavy_optional_packages():
    found = []
    for _, path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.Import):
                        names = [alias.name for alias in sub.names]
                    elif isinstance(sub, ast.ImportFrom):
                        names = [sub.module or ""]
                    else:
                        continue
                    found += [(str(path.relative_to(REPO)), sub.lineno, name) for name in names
                              if name.split(".")[0] not in LAZY_IMPORTS_ALLOWED]
    assert found == [], found


def test_both_edit_contexts_offer_every_operation_the_methods_use():
    import dataclasses
    import inspect

    from lga_dist.distributed.editing import ShardedEditContext
    from lga_dist.editing.base import EditContext, EditOps

    operations = [name for name, _ in inspect.getmembers(EditOps, inspect.isfunction) if not name.startswith("_")]
    assert len(operations) == 13
    for implementation in (EditContext, ShardedEditContext):
        fields = {f.name for f in dataclasses.fields(implementation)} if dataclasses.is_dataclass(implementation) \
            else set()  # EditContext's second_moment is a field: C computed lazily per layer
        missing = [name for name in operations if not callable(getattr(implementation, name, None))
                   and name not in fields]
        assert missing == [], (implementation.__name__, missing)
    assert isinstance(ShardedEditContext(group=None, adapter=None, fingerprint="x"), EditOps)
