# DeepSeek-VL2 behind a Cog API. `make demo` and `make test` work offline on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

PORT   ?= 5000
HOST   ?= 0.0.0.0
IMAGE  ?= examples/stages.png
PROMPT ?= Describe each stage of this <image> in detail.
DEMO_MODEL := demo-model
# make bench BENCH_ARGS="--checkpoint weights/deepseek-vl2-tiny"  (default: random weights, real tiny shape)
BENCH_ARGS ?= --config tests/fixtures/real-configs/deepseek-vl2-tiny.json

.PHONY: venv kernels demo test predict schema serve bench clean

# The environment, and the CPU kernels built once here (with a line of progress) so that no request, and
# no setup, waits for a C++ build; a second run finds them built in a second or two.
venv: $(STAMP) kernels

kernels: $(STAMP)
	$(PY) scripts/build_kernels.py

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	@rm -f $(VENV)/.installed-* && touch $@

# A random checkpoint in the official layout (made here, nothing downloaded), then one prediction
# through the real Predictor.
demo: venv
	$(PY) scripts/make_random_checkpoint.py $(DEMO_MODEL)
	DEEPSEEK_VL2_WEIGHTS=$(CURDIR)/$(DEMO_MODEL) $(PY) predict.py --image "$(IMAGE)" --prompt "$(PROMPT)" \
		--max-length-tokens 48 --random-weights-note

test: venv
	$(PY) -m pytest -q tests

# Real weights: DEEPSEEK_VL2_WEIGHTS=deepseek-ai/deepseek-vl2-tiny make predict IMAGE=... PROMPT=...
predict: venv
	$(PY) predict.py --image "$(IMAGE)" --prompt "$(PROMPT)"

# Cog's server reads the input schema from .cog/openapi_schema.json; write it from predict.py.
schema: venv
	$(PY) scripts/write_openapi_schema.py

# Cog's own HTTP server (coglet), as in the container. Its worker runs `python` from PATH.
serve: schema
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PORT=$(PORT) COG_PREDICT_TYPE_STUB=predict.py:Predictor \
		$(PY) -m cog.server.http --host $(HOST)

bench: venv
	$(PY) scripts/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_MODEL) .cog .pytest_cache
