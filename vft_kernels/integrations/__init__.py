"""Drop-in patching of vft kernels onto third-party tokenizer code.

* ``vft_kernels.integrations.vector_quantize_pytorch``: ``vector_quantize_pytorch.FSQ``.
* ``vft_kernels.integrations.videoflextok``: the official VideoFlexTok models (FSQ, FlexAttention over
  packed sequences, sampler guidance).
* ``vft_kernels.integrations.flextok``: the official FlexTok models (FSQ, FlexAttention over packed
  sequences, sampler guidance).

Each offers ``patch(...) -> PatchHandle``, ``handle.unpatch()`` and a ``patched(...)`` context
manager. Patches are per instance (never a class or a module global), reversible, leave
``state_dict()`` untouched, and fall back to the original code for whatever the kernels do not
cover; ``handle.summary()`` says which. Importing this package imports nothing heavy, and
no submodule imports its third-party package before ``patch`` is called (the official-model
integrations only look their classes up in ``sys.modules``).

Optional dependencies: requirements-integrations.txt.
"""
from __future__ import annotations

import collections
import contextlib
import weakref
from typing import Callable, Optional

# integration name -> {patched target -> its active handle}
_HANDLES: "dict[str, weakref.WeakKeyDictionary[object, PatchHandle]]" = {}


class PatchHandle:
    """What one ``patch()`` call replaced, and how to undo it.

    ``summary()`` (also the repr) lists what was replaced and what was left to the original
    code, with the reason, plus any live counters an integration keeps (e.g. how many
    attention calls ran on vft and how many fell back, and why). ``unpatch()`` restores the
    originals (idempotent). As a context manager the handle unpatches on exit. The handle
    keeps only weak references to the patched objects."""

    def __init__(self, integration: str, title: str):
        self.integration = integration
        self.title = title
        self.lines: list[str] = []
        self.live: list[Callable[[], list[str]]] = []  # lines computed when summary() is called
        self._undo: list[Callable[[], None]] = []
        self._target: Optional[weakref.ref] = None
        self.active = True
        self.options: dict = {}  # the patch() options, compared when the target is patched again

    def summary(self) -> str:
        state = "" if self.active else " [unpatched]"
        lines = self.lines + [line for live in self.live for line in live()]
        return "\n".join([self.title + state] + ["  " + line for line in lines])

    __repr__ = summary

    def unpatch(self) -> None:
        """Restore every original method / class this handle replaced."""
        while self._undo:
            self._undo.pop()()
        target = self._target() if self._target is not None else None
        if target is not None and existing_handle(self.integration, target) is self:
            del _HANDLES[self.integration][target]
        self.active = False

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()

    # -- used by the integration modules ------------------------------------------------

    def register(self, target: object) -> None:
        """Record this handle as ``target``'s patch by its integration (``existing_handle``)."""
        self._target = weakref.ref(target)
        _HANDLES.setdefault(self.integration, weakref.WeakKeyDictionary())[target] = self

    def _guard(self, obj: object) -> None:
        """Make ``copy.deepcopy(obj)`` raise until ``unpatch`` (see _CopyGuard)."""
        if _GUARD in vars(obj):
            return
        vars(obj)[_GUARD] = _CopyGuard(self.title)
        ref = weakref.ref(obj)

        def undo():
            o = ref()
            if o is not None:
                vars(o).pop(_GUARD, None)

        self._undo.append(undo)

    def set_instance_attr(self, obj: object, name: str, value: object) -> None:
        """``obj.<name> = value`` in the instance ``__dict__`` only; undone by ``unpatch``."""
        self._guard(obj)
        had, old = name in vars(obj), vars(obj).get(name)
        vars(obj)[name] = value
        ref = weakref.ref(obj)

        def undo():
            o = ref()
            if o is None:
                return
            if had:
                vars(o)[name] = old
            else:
                vars(o).pop(name, None)

        self._undo.append(undo)

    def set_class(self, obj: object, cls: type) -> None:
        """Give ``obj`` the class ``cls`` (a subclass of its own); undone by ``unpatch``."""
        self._guard(obj)
        original, ref = type(obj), weakref.ref(obj)
        obj.__class__ = cls

        def undo():
            o = ref()
            if o is not None and type(o) is cls:
                o.__class__ = original

        self._undo.append(undo)


class CallStats:
    """Per-call counts of one handle's patched parts, shown live in its summary:
    "<what> calls so far: N <on_vft>[ (note)], M <fell_back> (reason: count; ...)"."""

    def __init__(self, what: str, on_vft: str, fell_back: str):
        self.what, self.on_vft, self.fell_back = what, on_vft, fell_back
        self.vft = 0
        self.fallbacks = collections.Counter()

    def note(self) -> str:
        return ""

    def lines(self) -> list[str]:
        if not self.vft + sum(self.fallbacks.values()):
            return [f"{self.what} calls so far: none"]
        line = f"{self.what} calls so far: {self.vft} {self.on_vft}{self.note()}"
        if self.fallbacks:
            line += f", {sum(self.fallbacks.values())} {self.fell_back} (" + "; ".join(
                f"{why}: {n}" for why, n in self.fallbacks.most_common()) + ")"
        return [line]


class _CopyGuard:
    """Stored in the ``__dict__`` of every object a handle changes: ``copy.deepcopy`` of it (or
    of a module holding it) raises instead of making a copy whose patched methods would still
    run the original's weights and could not be unpatched."""

    def __init__(self, title: str):
        self.title = title

    def __deepcopy__(self, memo):
        raise TypeError(f"cannot deep-copy an object patched by {self.title}: its patched methods belong to the "
                        "original. Copy the model before patching it, or unpatch() it, copy, and patch each copy")

    def __reduce__(self):
        raise TypeError(f"cannot pickle an object patched by {self.title}: unpatch() it first "
                        "(state_dict() is unaffected by the patch)")


_GUARD = "_vft_patched_by"


def override_reasons(obj: object, cls: type, covered: tuple, replaced: tuple) -> list[str]:
    """Why ``obj`` cannot be patched as a ``cls``: its type overrides methods in ``covered``
    (the behaviour the patch reproduces), or ``obj`` already has an instance-level
    replacement of a method in ``replaced`` (the ones the patch would set)."""
    reasons = []
    overridden = [m for m in covered if getattr(type(obj), m, None) is not getattr(cls, m, None)]
    if overridden:
        reasons.append(f"{type(obj).__name__} overrides {', '.join(overridden)}")
    reasons += [f"this instance's {name} was already replaced by other code" for name in replaced if name in vars(obj)]
    return reasons


def existing_handle(integration: str, target: object) -> Optional[PatchHandle]:
    """The active handle with which ``integration`` patched ``target`` (None if none)."""
    return _HANDLES.get(integration, {}).get(target)


@contextlib.contextmanager
def patched_context(patch: Callable[..., PatchHandle], integration: str, target: object, **kwargs):
    """``with``-block around ``patch(target, **kwargs)``: unpatches on exit unless ``target``
    was already patched by ``integration`` before the block (then that earlier patch stays)."""
    earlier = existing_handle(integration, target)
    handle = patch(target, **kwargs)
    try:
        yield handle
    finally:
        if earlier is None:
            handle.unpatch()
