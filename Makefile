# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is
# missing and reuse it afterwards: scripts/setup.sh returns at once when pyproject.toml, the set-up
# and llama.cpp's build flags are unchanged and the installed llama.cpp checks out.
VENV := .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast clean-stores

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/scalpel demo

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not e2e"

clean-stores:
	rm -rf models/*/ adapters/*/ .scalpel
