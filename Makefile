# The README's two commands: `make demo` and `make test`. Both install what they need first.
PYTHON ?= python3
STAMP := .eigenfast-installed

$(STAMP): setup.py $(wildcard csrc/*)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet --no-build-isolation -e ".[test]"
	touch $(STAMP)

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m eigenfast.cli demo

# pytest exits 5 when it collected nothing: that must fail, never pass silently.
test: $(STAMP)
	$(PYTHON) -m pytest -q tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(PYTHON) benches/bench_attribution.py
	$(PYTHON) benches/bench_token_bias.py
