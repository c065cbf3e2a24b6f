# Convenience aliases for the README's commands (run as root).
.PHONY: setup test demo bench
setup:
	bash scripts/setup.sh
test:
	bash scripts/test.sh
demo:
	bash scripts/demo.sh
bench:
	bash scripts/setup.sh && .venv/bin/python bench/run_all.py
