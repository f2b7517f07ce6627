# make demo: set up .venv and analyse the bundled MiniLM.  make test: what CI runs.
PYTHON ?= python3.11
VENV := .venv

.PHONY: demo test bench clean-venv

demo: $(VENV)/.installed
	$(VENV)/bin/drift analyze --model minilm

test:
	bash .ci/run

bench: $(VENV)/.installed
	$(VENV)/bin/python benchmarks/bench_read_rss.py

# torch first: the pinned CPU build, not a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install torch==2.13.0
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@

clean-venv:
	rm -rf $(VENV)
