"""Build of the tokenizer's optional C fast path (metadata lives in pyproject.toml).

The extension is optional: if the compiler is missing or the build fails, installation
goes on and neoxja.tokenizer uses its pure-Python scan, which gives the same ids.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """build_ext that warns instead of failing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any build failure means "use the fallback"
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        print(f"WARNING: the optional C tokenizer scan was not built ({exc}); the pure-Python scan will be used.")


setup(
    ext_modules=[
        Extension("neoxja._tokenizer_scan", sources=["neoxja/_tokenizer_scan.c"], optional=True),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
