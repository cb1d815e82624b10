# Two-command set-up: `make demo` and `make test` each create .venv when absent and install into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= demo_output

.PHONY: demo test lint format clean mutation deploy-venv

# The MONAI Deploy application's environment (deploy/README.md): installing the SDK changes what
# `import monai` loads, so it has a venv of its own. torch and the project's other dependencies come
# from .venv (a path file); the SDK, holoscan, the CUDA runtime wheel and highdicom from the package
# index; the project itself as a wheel (not editable); monai again inside it, so monai.deploy joins it.
DEPLOY_VENV := .deployvenv
$(DEPLOY_VENV)/.installed: $(STAMP) deploy/requirements.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(DEPLOY_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/base_venv.pth"
	$(DEPLOY_VENV)/bin/python -m pip install -q -r deploy/requirements.txt
	$(DEPLOY_VENV)/bin/python -m pip install -q --no-deps --ignore-installed "monai==$$($(BIN)/python -c "import monai; print(monai.__version__)")"
	touch $@

# the project's wheel is rebuilt and reinstalled on every call (it follows the working tree)
deploy-venv: $(DEPLOY_VENV)/.installed
	rm -rf $(DEPLOY_VENV)/wheel && $(BIN)/python -m pip wheel -q --no-deps --no-build-isolation -w $(DEPLOY_VENV)/wheel .
	$(DEPLOY_VENV)/bin/python -m pip install -q --no-deps --force-reinstall $(DEPLOY_VENV)/wheel/lesiondiffusion_monai-*.whl

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/lesiondiffusion demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mutation score of the core modules named in setup.cfg [mutmut] (slow; not part of CI)
mutation: $(STAMP)
	OMP_NUM_THREADS=1 nice -n 19 $(BIN)/mutmut run || true
	$(BIN)/python benchmarks/mutation_score.py

clean:
	rm -rf $(VENV) $(DEPLOY_VENV) $(DEMO_OUT) .pytest_cache mutants
