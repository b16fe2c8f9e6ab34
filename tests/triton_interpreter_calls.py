"""Faster device-function calls in Triton's interpreter, so the CPU suite spends its time in the
kernels rather than in the interpreter's bookkeeping.

Under TRITON_INTERPRET=1 a launch patches triton.language for the kernel (`_patch_lang`: every
builtin of tl, tl.core, tl.tensor and tl.math found with inspect.getmembers and wrapped), and
restores it when the grid is done. Triton 3.6-3.9 also repeat the whole patch at every call of a
@triton.jit helper inside the kernel: about 0.3 ms each, while tl is already patched for the
running grid. The dwconv kernels call small helpers for every kernel column and tap, so that
repeat was about 60% of their time under the interpreter (cProfile, triton 3.9).

`enable()` makes the repeat a no-op while a grid runs and the helper sees no triton.language
module that the grid's patch did not cover (the package's kernels and helpers all import the
same `tl`). A helper called outside a grid, or from a module that imports something else, is
patched as before. Nothing else changes: the same rewritten functions run on the same patched
builtins. Test-only: nothing in the package imports this.
"""
from __future__ import annotations

import inspect

_STATE = {"reason": None, "grids": 0, "patched": frozenset(), "full_patches": 0}


def enable() -> str:
    """Patch the interpreter (idempotent). Returns "" when active, else why not."""
    if _STATE["reason"] is None:
        _STATE["reason"] = _patch()
    return _STATE["reason"]


def full_patches() -> int:
    """How many times triton.language has been patched in full so far (for the tests)."""
    return _STATE["full_patches"]


def _patch() -> str:
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception as e:  # noqa: BLE001 - reported as the reason
        return f"triton's interpreter did not import ({e})"
    grid = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if grid is None or patch_lang is None or not callable(getattr(grid, "__call__", None)):
        return "this triton's interpreter has no GridExecutor / _patch_lang"
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    run_grid = grid.__call__

    langs_of = {}

    def lang_modules(fn):
        # The modules _patch_lang itself would patch for fn (its module's imports: looked up once).
        if fn not in langs_of:
            langs_of[fn] = frozenset(id(v) for v in fn.__globals__.values()
                                     if inspect.ismodule(v) and v in (tl, tl.core))
        return langs_of[fn]

    def grid_call(self, *args, **kwargs):
        outer = _STATE["patched"]
        _STATE["grids"] += 1
        _STATE["patched"] = frozenset()
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            _STATE["grids"] -= 1
            _STATE["patched"] = outer

    def patch_lang_once(fn):
        langs = lang_modules(fn)
        if _STATE["grids"] and langs and langs <= _STATE["patched"]:
            return scope_type() if scope_type is not None else None  # nothing to restore
        _STATE["full_patches"] += 1
        scope = patch_lang(fn)
        if _STATE["grids"]:
            _STATE["patched"] = _STATE["patched"] | langs
        return scope

    grid.__call__ = grid_call
    interpreter._patch_lang = patch_lang_once
    return ""
