# Placeholder so the Makefile dependency exists; the tokenizer's optional C extension is declared here.
from setuptools import setup

setup()
