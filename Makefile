# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv when it is
# missing and reuse it afterwards: scripts/setup.sh returns at once when pyproject.toml, the set-up
# and llama.cpp's build flags are unchanged and the installed llama.cpp checks out.
VENV := .venv
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint format clean-stores

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/scalpel demo

# lint, format, types and the import contract, then the whole suite
test: setup lint
	$(VENV)/bin/python -m pytest

test-fast: setup lint
	$(VENV)/bin/python -m pytest -m "not e2e"

# also what to run before a commit (or install it as a hook: ln -s ../../scripts/pre-commit .git/hooks/pre-commit)
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean-stores:
	rm -rf models/*/ adapters/*/ .scalpel
