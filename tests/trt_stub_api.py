"""TensorRT's compiled Python API as its ``.pyi`` stubs declare it, and a strict fake built from them.

:class:`StubAPI` reads ``tensorrt-stubs`` (10.13; a few of its lines are not valid Python and
are repaired to ``(*args, **kwargs)`` signatures, counted in ``repaired``): classes, bases,
methods with their overloads, properties (and whether they have a setter), attributes, enum
members with values and the ``[DEPRECATED]`` notes of their docstrings.

:func:`fake_tensorrt` makes a ``tensorrt`` module from it that behaves like the pybind11
bindings where the project depends on it, and refuses what they refuse:

* a name a class does not have raises ``AttributeError``; a call that binds to none of a
  method's signatures raises ``TypeError``; an argument annotated with a TensorRT class
  must be one (``Dims`` also takes a tuple/list, as pybind11 converts them); setting an
  attribute without a setter raises ``AttributeError``;
* methods return a *new* wrapper object per call, of the class the stub annotates (the
  base ``ILayer`` from ``get_layer``), sharing the state of the "C++" object underneath;
  ``obj.__class__ = trt.Subclass`` casts it (only to a subclass, as pybind11 allows);
* enum members are named, hashable and ``int()``-able, never equal to ints.

Return values come from ``overrides`` (``{"Class.member": fn(obj, *args, **kwargs)}``) or
default by annotation (``bool`` True, ``int`` 1, a TensorRT class: a new object of it). Every
member looked up is recorded in :class:`Uses` (owner class, member, keywords), which is what
the API-surface test checks against TensorRT 11.4's strings.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import types
from typing import Any, Callable

_DEF = re.compile(r"^(\s*def \w+)\((.*)\)(\s*->.*)?:\s*$")
_ENUM_VALUE = re.compile(r"# value = <[\w.]+: (-?\d+)>")
BUFFER_CLASSES = ("IHostMemory",)   # pybind11 objects with the buffer protocol


@dataclasses.dataclass
class Member:
    kind: str                                  # method | property | attribute | enum | class | staticmethod
    signatures: list[inspect.Signature] = dataclasses.field(default_factory=list)
    returns: list[str] = dataclasses.field(default_factory=list)
    annotation: str = ""
    settable: bool = False
    value: Any = None
    doc: str = ""


def deprecation(doc: str) -> str | None:
    """The ``[DEPRECATED] ...`` note of ``doc`` when it is about the documented name itself.

    A note inside parentheses is about something the text mentions (``WORKSPACE``'s doc
    says "(... IAlgorithmSelector ... [DEPRECATED] ...)"), not about the name.
    """
    index = doc.find("[DEPRECATED]")
    if index < 0 or doc[:index].count("(") > doc[:index].count(")"):
        return None
    return " ".join(doc[index:].split())[:160]


@dataclasses.dataclass
class StubClass:
    name: str
    bases: list[str]
    members: dict[str, Member]
    doc: str


def _signature(node: ast.FunctionDef) -> inspect.Signature:
    params = []
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        kind = inspect.Parameter.POSITIONAL_ONLY if i < len(args.posonlyargs) else \
            inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(arg.arg, kind, default=inspect.Parameter.empty if default is None else ...,
                                        annotation=ast.unparse(arg.annotation) if arg.annotation else ""))
    if args.vararg:
        params.append(inspect.Parameter(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY,
                                        default=inspect.Parameter.empty if default is None else ...,
                                        annotation=ast.unparse(arg.annotation) if arg.annotation else ""))
    if args.kwarg:
        params.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)


def _enum_docs(doc: str) -> dict[str, str]:
    """``Members:`` section of a pybind11 enum docstring -> {member: its text}."""
    section = doc.split("Members:", 1)[1] if "Members:" in doc else ""
    out, current = {}, None
    for line in section.splitlines():
        match = re.match(r"\s{2,}([A-Z][A-Z0-9_]*)\s*:(.*)", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


class StubAPI:
    """Classes and module members of a ``.pyi`` stub."""

    def __init__(self, source: str) -> None:
        self.lines = source.splitlines()
        self.repaired: list[str] = []
        tree = self._parse()
        self.classes: dict[str, StubClass] = {}
        self.module: dict[str, Member] = {}
        self._read_body(tree.body, self.module, prefix="")

    def _parse(self) -> ast.Module:
        while True:
            try:
                return ast.parse("\n".join(self.lines))
            except SyntaxError as exc:
                line = self.lines[exc.lineno - 1]
                match = _DEF.match(line)
                if match is None or exc.lineno in self.repaired:
                    raise
                self.lines[exc.lineno - 1] = f"{match.group(1)}(self, *args, **kwargs){match.group(3) or ''}:"
                self.repaired.append(exc.lineno)

    def _read_body(self, body: list, members: dict, prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                name = f"{prefix}{node.name}"
                doc = ast.get_docstring(node) or ""
                cls = StubClass(name, [ast.unparse(b) for b in node.bases], {}, doc)
                self.classes[name] = cls
                self._read_body(node.body, cls.members, prefix=f"{name}.")
                enum_docs = _enum_docs(doc)
                for member, text in enum_docs.items():
                    if member in cls.members:
                        cls.members[member].doc = text
                members[node.name] = Member("class", value=name, doc=doc)
            elif isinstance(node, ast.FunctionDef):
                self._read_function(node, members)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                annotation = ast.unparse(node.annotation)
                if annotation.startswith("typing.ClassVar"):
                    value = _ENUM_VALUE.search(self.lines[node.lineno - 1])
                    members[node.target.id] = Member("enum", annotation=annotation[len("typing.ClassVar["):-1],
                                                     value=int(value.group(1)) if value else None)
                else:
                    value = ast.literal_eval(node.value) if node.value is not None else None
                    members[node.target.id] = Member("attribute", annotation=annotation, settable=True, value=value)

    def _read_function(self, node: ast.FunctionDef, members: dict) -> None:
        decorators = [ast.unparse(d) for d in node.decorator_list]
        doc = ast.get_docstring(node) or ""
        returns = ast.unparse(node.returns) if node.returns else ""
        if "property" in decorators:
            members[node.name] = Member("property", annotation=returns, doc=doc)
        elif any(d.endswith(".setter") for d in decorators):
            members[node.name].settable = True
        else:
            kind = "staticmethod" if "staticmethod" in decorators else "method"
            member = members.setdefault(node.name, Member(kind, doc=doc))
            member.signatures.append(_signature(node))
            member.returns.append(returns)
            member.doc = member.doc or doc

    def lookup(self, cls: str, name: str) -> Member | None:
        """``name`` on ``cls`` or its bases (stub order)."""
        owner = self.owner_of(cls, name)
        return None if owner is None else self.classes[owner].members[name]

    def owner_of(self, cls: str, name: str) -> str | None:
        """The class (``cls`` or a base) that declares ``name``."""
        seen = [cls]
        while seen:
            current = self.classes.get(seen.pop(0))
            if current is None:
                continue
            if name in current.members:
                return current.name
            seen.extend(current.bases)
        return None

    def is_subclass(self, cls: str, base: str) -> bool:
        if cls == base:
            return True
        info = self.classes.get(cls)
        return bool(info) and any(self.is_subclass(b, base) for b in info.bases)

    def extend(self, source: str) -> None:
        """Add classes/members from a stub snippet (members of existing classes are merged)."""
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name in self.classes:
                scratch: dict = {}
                self._read_body(node.body, scratch, prefix=f"{node.name}.")
                self.classes[node.name].members.update(scratch)
            else:
                self._read_body([node], self.module, prefix="")


@dataclasses.dataclass
class Uses:
    """What the code under test looked up: (owner class or "tensorrt", member) -> keywords used."""

    names: dict[tuple[str, str], set[str]] = dataclasses.field(default_factory=dict)
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(self, owner: str, member: str, keywords: tuple = ()) -> None:
        self.names.setdefault((owner, member), set()).update(keywords)


class FakeEnum:
    """A pybind11 enum member: named, hashable, ``int()``-able, equal only to itself."""

    __slots__ = ("cls", "name", "value")

    def __init__(self, cls: str, name: str, value: int) -> None:
        self.cls, self.name, self.value = cls, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeEnum) and (other.cls, other.name) == (self.cls, self.name)

    def __hash__(self) -> int:
        return hash((self.cls, self.name))

    def __repr__(self) -> str:
        return f"<{self.cls.rsplit('.', 1)[-1]}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{self.cls.rsplit('.', 1)[-1]}.{self.name}"


class FakeTensorRT:
    """The fake module's machinery: the API, the recorder and the overrides."""

    def __init__(self, api: StubAPI, overrides: dict[str, Callable] | None = None) -> None:
        self.api, self.uses, self.overrides = api, Uses(), dict(overrides or {})

    # -- values --------------------------------------------------------------------------------
    def new(self, cls: str, state: dict | None = None) -> Any:
        """A new wrapper object of ``cls`` over ``state`` (the "C++ object": shared by its wrappers)."""
        if cls in BUFFER_CLASSES:
            obj = FakeBuffer(b"serialized")
        else:
            obj = FakeObject.__new__(FakeObject)
        object.__setattr__(obj, "_fake", self)
        object.__setattr__(obj, "_cls", cls)
        object.__setattr__(obj, "_state", {} if state is None else state)
        return obj

    def default(self, annotation: str) -> Any:
        annotation = annotation.strip("'\"")
        simple = {"bool": True, "int": 1, "float": 1.0, "str": "", "None": None, "bytes": b""}
        if annotation in simple:
            return simple[annotation]
        if annotation.startswith("list["):
            return []
        if annotation in self.api.classes:
            members = self.api.classes[annotation].members
            enum = next((name for name, m in members.items() if m.kind == "enum" and not name.startswith("__")), None)
            return FakeEnum(annotation, enum, members[enum].value) if enum else self.new(annotation)
        return None

    def check_argument(self, annotation: str, value: Any, where: str) -> None:
        """TensorRT classes must be given as one (``Dims`` also as a sequence of ints); others unchecked."""
        annotation = annotation.strip("'\"")
        if annotation not in self.api.classes:
            return
        if annotation.startswith("Dims") and isinstance(value, (tuple, list)) and all(
                isinstance(v, int) for v in value):
            return
        owner = value._cls if isinstance(value, (FakeObject, FakeBuffer)) else \
            value.cls if isinstance(value, FakeEnum) else None
        if owner is None or not self.api.is_subclass(owner, annotation):
            raise TypeError(f"{where}: incompatible function arguments: expected {annotation}, got "
                            f"{owner or type(value).__name__}")

    def call(self, owner: str, name: str, member: Member, bound_self: Any, args: tuple, kwargs: dict) -> Any:
        errors = []
        for signature, returns in zip(member.signatures, member.returns):
            try:
                params = list(signature.parameters.values())
                sig = signature.replace(parameters=params[1:]) if bound_self is not None and params and \
                    params[0].name == "self" else signature
                bound = sig.bind(*args, **kwargs)
                for key, value in bound.arguments.items():
                    self.check_argument(sig.parameters[key].annotation, value, f"{owner}.{name}")
            except TypeError as exc:
                errors.append(str(exc))
                continue
            self.uses.add(owner, name, tuple(kwargs))
            override = self.overrides.get(f"{owner}.{name}")
            if override is not None:
                return override(bound_self, *args, **kwargs)
            return self.default(returns)
        raise TypeError(f"{owner}.{name}(): incompatible function arguments ({'; '.join(errors)})")


class FakeObject:
    """An instance of a stub class (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:
        fake: FakeTensorRT = object.__getattribute__(self, "_fake")
        cls = object.__getattribute__(self, "_cls")
        state = object.__getattribute__(self, "_state")
        owner = fake.api.owner_of(cls, name)
        if owner is None:
            fake.uses.missing.append((cls, name))
            raise AttributeError(f"'tensorrt.{cls}' object has no attribute '{name}'")
        member = fake.api.classes[owner].members[name]
        if member.kind in ("method", "staticmethod"):
            return lambda *args, **kwargs: fake.call(owner, name, member, self, args, kwargs)
        fake.uses.add(owner, name)
        if name in state:
            return state[name]
        override = fake.overrides.get(f"{owner}.{name}")
        if override is not None:
            return override(self)
        if member.kind == "enum":
            return FakeEnum(member.annotation, name, member.value)
        return fake.default(member.annotation)

    def __setattr__(self, name: str, value: Any) -> None:
        fake: FakeTensorRT = object.__getattribute__(self, "_fake")
        cls = object.__getattribute__(self, "_cls")
        if name == "__class__":
            target = value._name if isinstance(value, FakeClass) else None
            if target is None or not fake.api.is_subclass(target, cls):
                raise TypeError(f"__class__ assignment: {target or value!r} is not a subclass of {cls}")
            object.__setattr__(self, "_cls", target)
            return
        owner = fake.api.owner_of(cls, name)
        if owner is None or not fake.api.classes[owner].members[name].settable:
            raise AttributeError(f"can't set attribute '{name}' of 'tensorrt.{cls}'")
        fake.uses.add(owner, name)
        object.__getattribute__(self, "_state")[name] = value

    def __repr__(self) -> str:
        return f"<fake tensorrt.{object.__getattribute__(self, '_cls')}>"


class FakeBuffer(bytes):
    """A buffer-protocol TensorRT object (``IHostMemory``)."""

    def __getattr__(self, name: str) -> Any:
        return FakeObject.__getattr__(self, name)


class FakeClass:
    """A stub class: calling it binds ``__init__``; its attributes are enum members and nested classes."""

    def __init__(self, fake: FakeTensorRT, name: str) -> None:
        self._fake, self._name = fake, name

    def __call__(self, *args, **kwargs) -> Any:
        owner = self._fake.api.owner_of(self._name, "__init__")
        if owner is None:
            raise TypeError(f"tensorrt.{self._name}: No constructor defined!")
        self._fake.call(owner, "__init__", self._fake.api.classes[owner].members["__init__"], None, ("self", *args),
                        kwargs)
        return self._fake.new(self._name)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        owner = self._fake.api.owner_of(self._name, name)
        if owner is None:
            self._fake.uses.missing.append((self._name, name))
            raise AttributeError(f"type object 'tensorrt.{self._name}' has no attribute '{name}'")
        member = self._fake.api.classes[owner].members[name]
        self._fake.uses.add(owner, name)
        if member.kind == "enum":
            return FakeEnum(member.annotation, name, member.value)
        if member.kind == "class":
            return FakeClass(self._fake, member.value)
        raise AttributeError(f"tensorrt.{self._name}.{name} is not a class attribute in this fake")


def fake_tensorrt(api: StubAPI, overrides: dict[str, Callable] | None = None) -> tuple[types.ModuleType, FakeTensorRT]:
    """``(module, machinery)``: a fake ``tensorrt`` module over ``api``."""
    fake = FakeTensorRT(api, overrides)

    class Module(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            member = api.module.get(name)
            if member is None:
                fake.uses.missing.append(("tensorrt", name))
                raise AttributeError(f"module 'tensorrt' has no attribute '{name}'")
            fake.uses.add("tensorrt", name)
            if member.kind == "class":
                return FakeClass(fake, member.value)
            if member.kind == "method":
                return lambda *args, **kwargs: fake.call("tensorrt", name, member, None, args, kwargs)
            return member.value if member.value is not None else fake.default(member.annotation)

    return Module("tensorrt"), fake


#: TensorRT 10.14+ classes for ``--attention native`` (names read from the 11.4 strings and pyGraph.cpp).
NATIVE_ATTENTION_API = '''
class LayerType:
    ATTENTION_INPUT: typing.ClassVar[LayerType]  # value = <LayerType.ATTENTION_INPUT: 51>
    ATTENTION_OUTPUT: typing.ClassVar[LayerType]  # value = <LayerType.ATTENTION_OUTPUT: 52>
class IAttention:
    decomposable: bool
    name: str
class IAttentionBoundaryLayer(ILayer):
    @property
    def attention(self) -> IAttention: ...
class IAttentionInputLayer(IAttentionBoundaryLayer): ...
class IAttentionOutputLayer(IAttentionBoundaryLayer): ...
'''


def tensorrt_api() -> StubAPI:
    """TensorRT 10.13's stubs plus :data:`NATIVE_ATTENTION_API` and ``__version__``; raises ``WheelUnavailable``."""
    import trt_real

    api = StubAPI(trt_real.stub_source())
    api.extend(NATIVE_ATTENTION_API)
    api.extend(f"__version__: str = {trt_real.STUBS.version.rsplit('.', 1)[0]!r}")   # tensorrt/__init__.pyi's
    return api


def tensorrt_api_or_skip() -> StubAPI:
    """:func:`tensorrt_api`, or skip (fail in CI) when ``tensorrt-stubs`` cannot be had."""
    import trt_real
    from optional_deps import skip_or_fail

    try:
        return tensorrt_api()
    except trt_real.WheelUnavailable as exc:
        skip_or_fail(f"tensorrt-stubs is unavailable: {exc}")
        raise


def parsed_network(fake: FakeTensorRT, attentions: int) -> list[dict]:
    """A parsed network in ``fake``: a Conv, then each IAttention's input and output boundary layers.

    ``get_layer`` makes a new base-class ``ILayer`` wrapper per call; the returned dicts are
    the layers' state (``_attention``: the IAttention's, shared by its two boundary layers).
    """
    layer_type = lambda name: FakeEnum("LayerType", name, fake.api.lookup("LayerType", name).value)  # noqa: E731
    layers = [{"type": layer_type("CONVOLUTION")}]
    for i in range(attentions):
        attention = {"name": f"/blocks.{i}/attn/Attention", "decomposable": False}
        # The IAttention's own state sits beside the layer's ("_attention"), so each read of
        # layer.attention makes a new wrapper over it, as pybind11 does.
        layers += [{"type": layer_type("ATTENTION_INPUT"), "_attention": attention},
                   {"type": layer_type("ATTENTION_OUTPUT"), "_attention": attention}]
    fake.overrides.update({
        "INetworkDefinition.num_layers": lambda net: len(layers),
        "INetworkDefinition.get_layer": lambda net, index: fake.new("ILayer", layers[index]),
        "IAttentionBoundaryLayer.attention": lambda layer: fake.new(
            "IAttention", object.__getattribute__(layer, "_state")["_attention"]),
        "INetworkDefinition.num_inputs": lambda net: 1,
        "ITensor.name": lambda tensor: "lr",
    })
    return layers
