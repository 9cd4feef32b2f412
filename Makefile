# DeepSeek-VL2 behind a Cog API. `make demo` and `make test` work offline on a fresh clone.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)
# The web page's packages (Gradio, gradio_client, selenium) beside those, outside the Cog image.
WEB_STAMP := $(VENV)/.web-installed-$(shell cat requirements-web.txt | cksum | cut -d' ' -f1)

PORT   ?= 5000
HOST   ?= 0.0.0.0
IMAGE  ?= examples/stages.png
PROMPT ?= Describe each stage of this <image> in detail.
DEMO_MODEL := demo-model
# make bench BENCH_ARGS="--checkpoint weights/deepseek-vl2-tiny"  (default: random weights, real tiny shape)
BENCH_ARGS ?= --config tests/fixtures/real-configs/deepseek-vl2-tiny.json

.PHONY: venv kernels demo test predict schema serve serve-stream bench clean web web-deps browser

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

test: venv web-deps browser
	$(PY) -m pytest -q tests

# Gradio caps pillow below 13, which the model pins: its packages install without their own dependency
# resolution (requirements-web.txt lists every one, pinned); nothing here touches torch.
web-deps: $(WEB_STAMP)

$(WEB_STAMP): requirements-web.txt | $(STAMP)
	$(PY) -m pip install -q --no-deps -r requirements-web.txt
	$(PY) -c "import gradio, gradio_client, selenium"
	@rm -f $(VENV)/.web-installed-* && touch $@

# The browser test's headless Chromium and its driver (Debian's packages; Playwright's own download is not
# reachable), installed when missing.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# The web page (python -m deepseek_vl2 web): MODEL= a directory or repo id (default: the demo checkpoint,
# random weights), WEB_HOST/WEB_PORT where it listens.
WEB_HOST ?= 127.0.0.1
WEB_PORT ?= 7860
web: venv web-deps
	$(PY) -m deepseek_vl2 web $(if $(MODEL),--model "$(MODEL)") --host $(WEB_HOST) --port $(WEB_PORT)

# Real weights: DEEPSEEK_VL2_WEIGHTS=deepseek-ai/deepseek-vl2-tiny make predict IMAGE=... PROMPT=...
predict: venv
	$(PY) predict.py --image "$(IMAGE)" --prompt "$(PROMPT)"

# Cog's server reads the input schema from .cog/openapi_schema.json; write it from predict.py.
schema: venv
	$(PY) scripts/write_openapi_schema.py

# Cog's own HTTP server (coglet), as in the container. Its worker runs `python` from PATH. Cog's server
# takes the number of predictions it admits at once from COG_MAX_CONCURRENCY: predict.py's SERVER_CONCURRENCY,
# twice the clients served without a refusal (DEEPSEEK_VL2_MAX_CONCURRENCY, else 16 on a GPU and 8 on a CPU),
# because Cog frees a slot only after it has sent the answer. TOKIO_WORKER_THREADS=1: its request handling on
# one thread, where its slot pool's try-lock cannot collide (two requests at once on two threads can get a
# 409 with slots free; see predict.cog_server_warnings).
serve: schema
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PORT=$(PORT) COG_PREDICT_TYPE_STUB=predict.py:Predictor TOKIO_WORKER_THREADS=1 \
		COG_MAX_CONCURRENCY=$$($(PY) -c 'import predict; print(predict.SERVER_CONCURRENCY)') \
		$(PY) -m cog.server.http --host $(HOST)

# The streaming predictor (predict.py:StreamingPredictor: the same inputs plus seed, the answer as pieces).
serve-stream: venv
	$(PY) scripts/write_openapi_schema.py --predictor predict.py:StreamingPredictor
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" PORT=$(PORT) COG_PREDICT_TYPE_STUB=predict.py:StreamingPredictor TOKIO_WORKER_THREADS=1 \
		COG_MAX_CONCURRENCY=$$($(PY) -c 'import predict; print(predict.SERVER_CONCURRENCY)') \
		$(PY) -m cog.server.http --host $(HOST)

bench: venv
	$(PY) scripts/benchmark.py $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_MODEL) .cog .pytest_cache

# The command line (python -m deepseek_vl2, see the README): one question about IMAGE, or a chat.
# MODEL is a model directory or a Hugging Face repo id (default: $DEEPSEEK_VL2_WEIGHTS); CLI_ARGS takes
# any other option, e.g. CLI_ARGS="--temperature 0 --json --draw boxes.png --seed 7".
#   make ask MODEL=deepseek-ai/deepseek-vl2-tiny IMAGE=photo.jpg PROMPT="<|grounding|>Find the cat."
#   make chat MODEL=deepseek-ai/deepseek-vl2-tiny IMAGE=photo.jpg
MODEL    ?=
CLI_ARGS ?=
CLI      = $(PY) -m deepseek_vl2 $(if $(MODEL),--model "$(MODEL)")
.PHONY: ask chat

ask: venv
	$(CLI) --image "$(IMAGE)" --prompt "$(PROMPT)" $(CLI_ARGS)

chat: venv
	$(CLI) --image "$(IMAGE)" --chat $(CLI_ARGS)
