"""Engines: a directory with the compressed model compiled ahead of time, and the loop that runs it.

``build`` (``kvc-build``) exports a prefill and a decode program with the kvc pass applied and
compiles them with AOTInductor; ``Engine`` (``kvc-run``) loads the directory and generates.
"""

from kvc_compile.engine.build import TARGETS, BuildResult, build
from kvc_compile.engine.manifest import FORMAT_VERSION, EngineError, Manifest
from kvc_compile.engine.runtime import Engine, Generation

__all__ = ["FORMAT_VERSION", "TARGETS", "BuildResult", "Engine", "EngineError", "Generation", "Manifest", "build"]
