# The two commands: `make demo` (set up what is missing, run the demo on the lab)
# and `make test` (set up what is missing, run the tests on the lab).
.PHONY: setup demo test lint lab-down

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/twopc demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/python -m pytest

lab-down:
	.venv/bin/twopc lab down
