"""Every public name of the ferry package explains itself: a docstring on each class, function,
method and property (pybind11-bound ones included, beyond the signature pybind11 writes), and
type stubs for the compiled core that match what it holds."""

from __future__ import annotations

import ast
import importlib
import inspect
import pydoc
import re
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator, List, Tuple

import pytest

import ferry

# Note: by name, since ferry.plan is the function plan() once the package has imported it.
MODULES: List[ModuleType] = [importlib.import_module(name) for name in (
    "ferry", "ferry.data", "ferry.optim", "ferry.engine", "ferry.model", "ferry.plan", "ferry.tokenizer")]
STUBS = Path(ferry.__file__).parent / "_C"


def is_documentable(value: Any) -> bool:
    """Classes, functions and properties carry their own docstrings; constants and type aliases
    (LOOP_KEYS, Batch) are described in their module's source and docs."""
    return inspect.isclass(value) or inspect.isroutine(value) or isinstance(value, property)


def public_names() -> Iterator[Tuple[str, Any]]:
    """Every name in the modules' __all__, and the public members of the classes among them."""
    seen = set()
    for module in MODULES:
        for name in module.__all__:
            value = getattr(module, name)
            if not is_documentable(value) or id(value) in seen:
                continue
            seen.add(id(value))
            yield f"{module.__name__}.{name}", value
            if inspect.isclass(value) and value.__module__.startswith("ferry"):
                for member_name, member in vars(value).items():
                    if not member_name.startswith("_") and is_documentable(getattr(value, member_name)):
                        yield f"{module.__name__}.{name}.{member_name}", member


def docstring(value: Any) -> str:
    """The docstring, less the signature line pybind11 puts first ("encode(self: ..., ...) -> ...")."""
    if isinstance(value, (classmethod, staticmethod)):
        value = value.__func__
    doc = inspect.getdoc(value) or ""
    lines = doc.splitlines()
    if lines and re.match(r"^\w+\(.*\)( -> .*)?$", lines[0]):
        lines = lines[1:]
    return "\n".join(lines).strip()


def test_every_module_lists_its_public_names() -> None:
    for module in MODULES:
        assert docstring(module), f"{module.__name__} has no docstring"
        defined = {name for name, value in vars(module).items()
                   if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
                   and (inspect.isclass(value) or inspect.isfunction(value))}
        assert defined <= set(module.__all__), f"{module.__name__}: {sorted(defined - set(module.__all__))}"


@pytest.mark.parametrize("name,value", list(public_names()), ids=lambda x: x if isinstance(x, str) else "")
def test_every_public_name_has_a_docstring_and_help(name: str, value: Any) -> None:
    assert docstring(value), f"{name} has no docstring"
    if not isinstance(value, (property, classmethod, staticmethod)):
        assert docstring(value).splitlines()[0] in pydoc.render_doc(value, renderer=pydoc.plaintext)


def test_the_undocumented_are_found() -> None:
    """The check above fails for what it should: pybind11's signature alone is no docstring."""
    def bound() -> None: ...

    bound.__doc__ = "bound(self: ferry._C.Engine, x: int) -> List[int]\n"
    assert docstring(bound) == ""
    assert docstring(property(lambda self: 0)) == ""
    assert docstring(ferry.data.ByteTokenizer.encode) == "The UTF-8 bytes of ``text`` as ids."


def stub_names() -> Iterator[Tuple[str, List[str]]]:
    """(module, class or function names) and (module.Class, member names) the stubs declare."""
    for path in sorted(STUBS.glob("*.pyi")):
        module = "ferry._C" if path.stem == "__init__" else f"ferry._C.{path.stem}"
        tree = ast.parse(path.read_text())
        top = [node for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))]
        yield module, [node.name for node in top if node.name != "__getattr__"]
        for node in top:
            if isinstance(node, ast.ClassDef):
                # Annotations without ClassVar are instance attributes (IoError's errno, path, ...).
                members = [item.name for item in node.body if isinstance(item, ast.FunctionDef)]
                members += [item.target.id for item in node.body if isinstance(item, ast.AnnAssign)
                            and ast.unparse(item.annotation).startswith("ClassVar")]
                yield f"{module}.{node.name}", members


def test_the_stubs_declare_only_what_the_extension_has() -> None:
    declared = list(stub_names())
    assert {module for module, _ in declared} >= {"ferry._C", "ferry._C.data", "ferry._C.optim"}
    for owner, names in declared:
        target: Any = ferry
        for part in owner.split(".")[1:]:
            target = getattr(target, part)
        missing = [name for name in names if not hasattr(target, name)]
        assert not missing, f"{owner} has no {missing}"
    for name in ("Dataset", "ByteTokenizer", "make_dataset"):
        assert name in dict(declared)["ferry._C.data"]
