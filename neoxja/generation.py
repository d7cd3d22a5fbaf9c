"""Text generation (placeholder until the generation work lands; see issue 4)."""


class GenerationMixin:
    def generate(self, *args, **kwargs):
        raise NotImplementedError("generate() is not implemented yet")
