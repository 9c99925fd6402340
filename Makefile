# The two commands README.md gives a fresh machine.
PY ?= python3

.PHONY: setup demo test

setup:
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'

demo: setup
	hattn demo

test: setup
	$(PY) -m pytest -q -p no:warnings
