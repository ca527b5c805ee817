# The two commands: `make demo` (set up what is missing, run the demo on the lab)
# and `make test` (set up what is missing, run the tests on the lab).
# `make unit` is the fast tier: ruff, mypy, the layering (lint-imports) and every test
# that needs no lab.
.PHONY: setup demo test unit lint lab-down apidocs

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/twopc demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache
	.venv/bin/python -m pytest || { code=$$?; .venv/bin/python scripts/crash_report.py; exit $$code; }

unit: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/lint-imports --no-cache
	.venv/bin/python -m pytest -m "not lab"

lab-down:
	.venv/bin/twopc lab down

# The library's API reference, from its docstrings (pdoc): build/apidocs/index.html.
apidocs: setup
	.venv/bin/python scripts/apidocs.py build/apidocs
