# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is
# missing and reuse it afterwards (it is reinstalled only when pyproject.toml or setup.sh change).
VENV := .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean-stores

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/scalpel demo

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not e2e"

clean-stores:
	rm -rf models/*/ adapters/*/ .scalpel
