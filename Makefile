# Developer shortcuts; `./run.sh setup` creates .venv first.
PY := .venv/bin/python

.PHONY: setup lint test demo smoke
setup:
	bash run.sh setup
lint:
	.venv/bin/ruff check .
	.venv/bin/mypy
test:
	bash run.sh test
demo:
	bash run.sh demo
smoke:
	$(PY) -m bench.smoke
